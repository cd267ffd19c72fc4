//! Both ends of a simulated link over loopback TCP.

use std::sync::Arc;

use qkdnet_link::block::ProtocolConfig;
use qkdnet_net::local::run_local;
use qkdnet_net::session::LinkParams;
use qkdnet_optics::device::Eve;
use qkdnet_optics::preset;

fn params(eve: &str, km: f64, block_gates: u64) -> LinkParams {
    let link = preset::get("metro-1ghz")
        .expect("preset")
        .at_distance(km)
        .expect("distance");
    LinkParams {
        link_id: "test-link".into(),
        proto: ProtocolConfig {
            eps_sec: link.postproc.eps_sec.get(),
            eps_cor: link.postproc.eps_cor.get(),
            classes: link.source.classes().iter().map(|c| (c.1, c.2)).collect(),
            ..Default::default()
        },
        link,
        eve: Eve::parse(eve).expect("eve"),
        block_gates,
        window: 4,
        bootstrap: Arc::new(zeroize::Zeroizing::new(vec![7u8; 1024])),
        seed: Some(11),
        pass: None,
    }
}

#[test]
fn a_simulated_link_over_tcp_distils_identical_keys() {
    let r = run_local(params("none", 20.0, 150_000_000), 2).expect("run");
    println!("{r:?}");
    assert!(r.keys_equal);
    assert_eq!(r.blocks_ok, 2, "{:?}", r.abort_reasons);
    assert!(r.final_key_bits > 10_000);
    assert!(r.qber > 0.005 && r.qber < 0.05, "{}", r.qber);
}

#[test]
fn intercept_resend_on_the_emulated_fibre_aborts_every_block() {
    let r = run_local(params("intercept-resend:1.0", 20.0, 100_000_000), 2).expect("run");
    assert_eq!(r.blocks_ok, 0);
    assert_eq!(r.final_key_bits, 0);
    assert_eq!(r.blocks_aborted, 2);
    assert!(r.keys_equal);
}
