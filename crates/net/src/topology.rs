//! Network topologies: nodes, the SAEs attached to them and the QKD links
//! between them, as a TOML file (`topologies/*.toml`).
//!
//! ```toml
//! [network]
//! name = "demo"
//! description = "a small metro network"
//! time_scale = 1.0            # link seconds per wall second (1 = real time)
//!
//! [[node]]
//! id = "hub"                  # also the node's KME ID: A-Z a-z 0-9 . _ - (1..64)
//! role = "core"               # free text (core, access, relay, ground-station)
//!
//! [[sae]]
//! id = "sae-hub"              # an application attached to a node's KME
//! node = "hub"
//!
//! [[link]]
//! a = "hub"                   # Alice's end (runs the simulated source)
//! b = "north"                 # Bob's end
//! preset = "metro-1ghz"       # a built-in device preset, or a path to a preset TOML
//! distance_km = 12.0
//! # id = "hub-north"          # default: "A-B"
//! # eve = "none"              # none | intercept-resend:FRACTION | pns
//! # reconciler = "cascade"    # cascade | cascade-opt | ldpc
//! # block_gates = 1e8         # default: about 2e6 sifted key bits per block
//!
//! [[link]]                    # a satellite downlink: a satellite preset, no distance_km
//! a = "satellite-gs-1"
//! b = "ground-2"
//! preset = "micius2017"
//! pass_period_s = 600         # seconds of link time between pass starts (default 86400)
//! pass_offset_s = 0           # first pass start (default 0)
//! ```
//!
//! [`Topology::validate`] checks everything that can be checked before a
//! process starts — unknown nodes, duplicate IDs, lengths, presets and whether
//! each link can produce key at all (the finite-key model at its block size) —
//! and names the offending entry in its error.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use qkdnet_kms::ids::{KmeId, SaeId};
use qkdnet_link::msg::Reconciler;
use qkdnet_optics::device::{Eve, LinkConfig};
use qkdnet_optics::keyrate::{Evaluator, Model, ModelOptions};
use serde::{Deserialize, Serialize};

use crate::NetError;

/// The `[network]` table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkMeta {
    /// Network name.
    pub name: String,
    /// What it is.
    #[serde(default)]
    pub description: String,
    /// Link seconds per wall second (1 = real time).
    #[serde(default = "one")]
    pub time_scale: f64,
}

fn one() -> f64 {
    1.0
}

/// A `[[node]]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Node (and KME) ID.
    pub id: String,
    /// Free-text role.
    #[serde(default)]
    pub role: Option<String>,
}

/// A `[[sae]]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SaeSpec {
    /// SAE ID.
    pub id: String,
    /// Node whose KME serves it.
    pub node: String,
}

/// A `[[link]]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    /// Link ID (default `A-B`).
    #[serde(default)]
    pub id: Option<String>,
    /// Alice's node.
    pub a: String,
    /// Bob's node.
    pub b: String,
    /// Device preset name or TOML path.
    pub preset: String,
    /// Fibre length, km (fibre presets only).
    #[serde(default)]
    pub distance_km: Option<f64>,
    /// Satellite presets: seconds between pass starts (default 86400: one pass a day).
    #[serde(default)]
    pub pass_period_s: Option<f64>,
    /// Satellite presets: link time of the first pass start (default 0).
    #[serde(default)]
    pub pass_offset_s: Option<f64>,
    /// Eavesdropper on the simulated channel.
    #[serde(default)]
    pub eve: Option<String>,
    /// Reconciliation algorithm.
    #[serde(default)]
    pub reconciler: Option<String>,
    /// Gates per block.
    #[serde(default)]
    pub block_gates: Option<f64>,
}

/// A topology file as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// `[network]`.
    pub network: NetworkMeta,
    /// `[[node]]`.
    #[serde(rename = "node", default)]
    pub nodes: Vec<NodeSpec>,
    /// `[[sae]]`.
    #[serde(rename = "sae", default)]
    pub saes: Vec<SaeSpec>,
    /// `[[link]]`.
    #[serde(rename = "link", default)]
    pub links: Vec<LinkSpec>,
}

/// A link after validation.
#[derive(Debug, Clone)]
pub struct ValidLink {
    /// Link ID.
    pub id: String,
    /// Alice's node.
    pub a: KmeId,
    /// Bob's node.
    pub b: KmeId,
    /// Preset as written (name or path).
    pub preset: String,
    /// Fibre length, km (0 for a satellite link).
    pub distance_km: f64,
    /// Satellite links: when passes happen and what one yields.
    pub pass: Option<PassSchedule>,
    /// The physical link at its length.
    pub config: LinkConfig,
    /// Eavesdropper as written.
    pub eve: String,
    /// Reconciler as written.
    pub reconciler: String,
    /// Gates per block.
    pub block_gates: u64,
    /// The finite-key model's secret key rate at this block size, bit/s of link time.
    pub model_key_bps: f64,
}

/// The passes of a satellite link.
#[derive(Debug, Clone, PartialEq)]
pub struct PassSchedule {
    /// Seconds between pass starts.
    pub period_s: f64,
    /// Start of the first pass (link time).
    pub offset_s: f64,
    /// Length of a pass, seconds.
    pub duration_s: f64,
    /// Secret key of one pass processed as one finite block (available at the pass end), bits.
    pub key_bits_per_pass: f64,
}

/// A topology that passed [`Topology::validate`].
#[derive(Debug, Clone)]
pub struct ValidTopology {
    /// `[network]`.
    pub meta: NetworkMeta,
    /// Nodes in file order.
    pub nodes: Vec<KmeId>,
    /// SAE → node.
    pub saes: BTreeMap<SaeId, KmeId>,
    /// Links in file order.
    pub links: Vec<ValidLink>,
}

/// Loads a device preset by name, or from a TOML file when `arg` looks like a path.
pub fn load_preset(arg: &str) -> Result<LinkConfig, NetError> {
    if arg.ends_with(".toml") || arg.contains('/') {
        let text = std::fs::read_to_string(arg)
            .map_err(|e| NetError::Config(format!("reading preset file {arg}: {e}")))?;
        LinkConfig::from_toml(&text).map_err(|e| NetError::Config(format!("in {arg}: {e}")))
    } else {
        Ok(qkdnet_optics::preset::get(arg)?)
    }
}

/// Expected sifted key-basis (Z) bits per gate, from the detection model.
pub fn sifted_z_per_gate(link: &LinkConfig) -> f64 {
    let qz = link.source.basis_prob_z();
    qkdnet_optics::sim::expected_tallies(link, 1)
        .iter()
        .map(|(det, _, _)| det * qz * qz)
        .sum()
}

/// Gates per block for about `target_bits` sifted key bits (at least 1e6 gates).
pub fn default_block_gates(link: &LinkConfig, target_bits: f64) -> u64 {
    let per_gate = sifted_z_per_gate(link);
    if per_gate > 0.0 {
        ((target_bits / per_gate).ceil() as u64).clamp(1_000_000, 1 << 40)
    } else {
        1 << 40
    }
}

/// The finite-key model (Lim et al. 2014, the preset's intensities) for a
/// block of `block_gates` gates, in secret bits per second of link time.
pub fn model_key_bps(link: &LinkConfig, block_gates: u64) -> f64 {
    let block_bits = (sifted_z_per_gate(link) * block_gates as f64).max(1e3);
    Evaluator::new(
        link,
        ModelOptions {
            model: Model::Finite,
            block_bits,
            optimize: false,
        },
    )
    .and_then(|mut ev| ev.at_link(link))
    .map(|p| p.key_rate_bps)
    .unwrap_or(0.0)
}

impl Topology {
    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Topology, NetError> {
        toml::from_str(text).map_err(|e| NetError::Config(format!("topology: {e}")))
    }

    /// Reads and parses a file.
    pub fn from_file(path: &Path) -> Result<Topology, NetError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| NetError::Config(format!("cannot read {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| NetError::Config(format!("{}: {e}", path.display())))
    }

    /// Checks the topology; every error names the entry at fault.
    pub fn validate(&self) -> Result<ValidTopology, NetError> {
        let bad = |m: String| Err(NetError::Config(m));
        let ts = self.network.time_scale;
        if !(ts.is_finite() && ts > 0.0 && ts <= 1000.0) {
            return bad(format!(
                "[network] time_scale must be in (0, 1000], got {ts}"
            ));
        }
        if self.nodes.is_empty() {
            return bad("the topology has no [[node]]".into());
        }
        let mut nodes = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let id = KmeId::new(&n.id).map_err(|_| {
                NetError::Config(format!(
                    "node {} ('{}'): IDs are 1 to 64 of A-Z a-z 0-9 . _ -",
                    i + 1,
                    n.id
                ))
            })?;
            if !seen.insert(id.clone()) {
                return bad(format!("duplicate node ID '{}'", n.id));
            }
            nodes.push(id);
        }
        let node = |what: String, id: &str| -> Result<KmeId, NetError> {
            KmeId::new(id)
                .ok()
                .filter(|k| seen.contains(k))
                .ok_or_else(|| NetError::Config(format!("{what}: unknown node '{id}'")))
        };
        let mut saes = BTreeMap::new();
        for s in &self.saes {
            let id = SaeId::new(&s.id).map_err(|_| {
                NetError::Config(format!(
                    "SAE '{}': IDs are 1 to 64 of A-Z a-z 0-9 . _ -",
                    s.id
                ))
            })?;
            let n = node(format!("SAE '{}'", s.id), &s.node)?;
            if saes.insert(id, n).is_some() {
                return bad(format!("duplicate SAE ID '{}'", s.id));
            }
        }
        let mut links = Vec::new();
        let mut ids = BTreeSet::new();
        let mut pairs = BTreeSet::new();
        for (i, l) in self.links.iter().enumerate() {
            let id = l.id.clone().unwrap_or_else(|| format!("{}-{}", l.a, l.b));
            let what = format!("link {} ('{id}')", i + 1);
            if id.is_empty() || id.len() > 128 {
                return bad(format!("{what}: link IDs are 1 to 128 bytes"));
            }
            if !ids.insert(id.clone()) {
                return bad(format!("duplicate link ID '{id}'"));
            }
            let a = node(what.clone(), &l.a)?;
            let b = node(what.clone(), &l.b)?;
            if a == b {
                return bad(format!("{what}: both ends are node '{}'", l.a));
            }
            let pair = if a < b {
                (a.clone(), b.clone())
            } else {
                (b.clone(), a.clone())
            };
            if !pairs.insert(pair) {
                return bad(format!(
                    "{what}: nodes '{}' and '{}' are already linked",
                    l.a, l.b
                ));
            }
            let base =
                load_preset(&l.preset).map_err(|e| NetError::Config(format!("{what}: {e}")))?;
            if base.source.classes().len() != 3 {
                return bad(format!(
                    "{what}: preset '{}' is not a three-intensity decoy-state source, which the link engine needs",
                    l.preset
                ));
            }
            let satellite = matches!(base.channel, qkdnet_optics::device::Channel::Satellite(_));
            let (config, distance_km, pass) = if satellite {
                if l.distance_km.is_some() {
                    return bad(format!(
                        "{what}: preset '{}' is a satellite downlink; its range comes from the pass geometry, drop distance_km",
                        l.preset
                    ));
                }
                let period = l.pass_period_s.unwrap_or(86_400.0);
                let offset = l.pass_offset_s.unwrap_or(0.0);
                let plan = crate::session::PassPlan::from_link(&base, period, offset)
                    .map_err(|e| NetError::Config(format!("{what}: {e}")))?;
                let summary = qkdnet_optics::keyrate::pass_summary(&base, 1.0)
                    .map_err(|e| NetError::Config(format!("{what}: {e}")))?;
                let sched = PassSchedule {
                    period_s: period,
                    offset_s: offset,
                    duration_s: plan.duration_s(),
                    key_bits_per_pass: summary.final_key_bits,
                };
                (base, 0.0, Some(sched))
            } else {
                if l.pass_period_s.is_some() || l.pass_offset_s.is_some() {
                    return bad(format!(
                        "{what}: pass_period_s and pass_offset_s are for satellite presets; '{}' is not one",
                        l.preset
                    ));
                }
                let Some(km) = l.distance_km else {
                    return bad(format!("{what}: distance_km is missing"));
                };
                if !(km.is_finite() && km >= 0.0) {
                    return bad(format!(
                        "{what}: distance_km must be a length >= 0, got {km}"
                    ));
                }
                let config = base
                    .at_distance(km)
                    .map_err(|e| NetError::Config(format!("{what}: {e}")))?;
                (config, km, None)
            };
            let eve = l.eve.clone().unwrap_or_else(|| "none".into());
            Eve::parse(&eve).map_err(|e| NetError::Config(format!("{what}: {e}")))?;
            let reconciler = l.reconciler.clone().unwrap_or_else(|| "cascade".into());
            Reconciler::parse(&reconciler).map_err(|e| NetError::Config(format!("{what}: {e}")))?;
            let block_gates = match l.block_gates {
                Some(g) if g.is_finite() && (1e3..=1e13).contains(&g) => g.round() as u64,
                Some(g) => {
                    return bad(format!(
                        "{what}: block_gates must be from 1e3 to 1e13, got {g}"
                    ));
                }
                None => default_block_gates(&config, 2e6),
            };
            let model = match &pass {
                Some(p) => p.key_bits_per_pass / p.period_s,
                None => model_key_bps(&config, block_gates),
            };
            if model <= 0.0 {
                return bad(match &pass {
                    Some(_) => format!(
                        "{what}: preset '{}' yields no secret key in one pass (finite-key model)",
                        l.preset
                    ),
                    None => format!(
                        "{what}: preset '{}' cannot close {distance_km} km: the finite-key model gives no secret key at {:.1} dB with blocks of {block_gates} gates",
                        l.preset,
                        config.channel.loss_db()
                    ),
                });
            }
            links.push(ValidLink {
                id,
                a,
                b,
                preset: l.preset.clone(),
                distance_km,
                pass,
                config,
                eve,
                reconciler,
                block_gates,
                model_key_bps: model,
            });
        }
        Ok(ValidTopology {
            meta: self.network.clone(),
            nodes,
            saes,
            links,
        })
    }
}
