//! Pulses simulated per second per core at 10, 50 and 100 km on a 1 GHz
//! decoy-state link (the `metro-1ghz` preset), detections discarded.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use qkdnet_optics::device::Eve;
use qkdnet_optics::preset;
use qkdnet_optics::sim::Simulator;

fn simulate(c: &mut Criterion) {
    let mut g = c.benchmark_group("simulate_metro_1ghz");
    let pulses: u64 = 100_000_000;
    g.throughput(Throughput::Elements(pulses));
    g.sample_size(10);
    for km in [10.0, 50.0, 100.0] {
        let link = preset::get("metro-1ghz").unwrap().at_distance(km).unwrap();
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{km}km")),
            &link,
            |b, link| {
                let mut seed = 0;
                b.iter(|| {
                    seed += 1;
                    let mut sim = Simulator::new(link, Eve::None, seed).unwrap();
                    let mut n = 0u64;
                    sim.run(pulses, &mut |_| {
                        n += 1;
                        Ok::<(), ()>(())
                    })
                    .unwrap();
                    n
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, simulate);
criterion_main!(benches);
