//! Device models in physical units: what a link is built from.
//!
//! A [`LinkConfig`] is a source, a channel and a receiver, plus the
//! post-processing assumptions the key-rate models need (error-correction
//! efficiency, security parameters). It is read from TOML (see `presets/`), and
//! every field is range-checked while it is parsed. The photon statistics a
//! source emits are in [`crate::photon`]; how the receiver turns arriving
//! photons into clicks is in [`crate::detection`].

use serde::{Deserialize, Serialize};

use crate::OpticsError;
use crate::satellite::SatellitePass;
use crate::units::{NonNegative, Positive, Probability, db_to_transmittance};

/// One intensity class of a weak coherent (decoy-state) source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntensityClass {
    /// A label for reports ("signal", "decoy", "vacuum").
    pub label: String,
    /// Mean photon number per pulse, μ.
    pub mean_photons: NonNegative,
    /// Probability that Alice picks this class for a pulse.
    pub prob: Probability,
}

/// The transmitter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Source {
    /// Phase-randomised weak coherent pulses (Poisson photon numbers) with
    /// decoy intensities: the workhorse of deployed decoy-state BB84.
    WeakCoherent {
        /// Pulse repetition rate in Hz.
        rep_rate_hz: Positive,
        /// Probability that Alice prepares in the Z (key) basis.
        basis_prob_z: Probability,
        /// One to four intensity classes; the first is the signal. Probabilities sum to 1.
        intensities: Vec<IntensityClass>,
    },
    /// A triggered single-photon source (e.g. a quantum dot).
    SinglePhoton {
        /// Pulse repetition rate in Hz.
        rep_rate_hz: Positive,
        /// Probability that Alice prepares in the Z (key) basis.
        basis_prob_z: Probability,
        /// Probability that a trigger yields a photon into the fibre (end-to-end source efficiency).
        efficiency: Probability,
        /// Probability that an emitted pulse holds two photons instead of one
        /// (≈ g2(0)·⟨n⟩/2 for small values).
        multi_photon_prob: Probability,
    },
}

impl Source {
    /// Pulse repetition rate in Hz.
    pub fn rep_rate_hz(&self) -> f64 {
        match self {
            Source::WeakCoherent { rep_rate_hz, .. } | Source::SinglePhoton { rep_rate_hz, .. } => {
                rep_rate_hz.get()
            }
        }
    }

    /// Alice's probability of the Z basis.
    pub fn basis_prob_z(&self) -> f64 {
        match self {
            Source::WeakCoherent { basis_prob_z, .. }
            | Source::SinglePhoton { basis_prob_z, .. } => basis_prob_z.get(),
        }
    }

    /// The intensity classes as (label, μ, probability); a single-photon
    /// source has one class with μ = its efficiency.
    pub fn classes(&self) -> Vec<(String, f64, f64)> {
        match self {
            Source::WeakCoherent { intensities, .. } => intensities
                .iter()
                .map(|c| (c.label.clone(), c.mean_photons.get(), c.prob.get()))
                .collect(),
            Source::SinglePhoton { efficiency, .. } => {
                vec![("single-photon".to_string(), efficiency.get(), 1.0)]
            }
        }
    }

    fn validate(&self) -> Result<(), OpticsError> {
        if let Source::WeakCoherent { intensities, .. } = self {
            if intensities.is_empty() || intensities.len() > 4 {
                return Err(OpticsError::invalid(
                    "source.intensities",
                    format!("need 1 to 4 intensity classes, got {}", intensities.len()),
                ));
            }
            let sum: f64 = intensities.iter().map(|c| c.prob.get()).sum();
            if (sum - 1.0).abs() > 1e-9 {
                return Err(OpticsError::invalid(
                    "source.intensities",
                    format!("class probabilities must sum to 1, got {sum}"),
                ));
            }
            for c in intensities {
                if c.mean_photons.get() > 20.0 {
                    return Err(OpticsError::invalid(
                        "source.intensities.mean_photons",
                        format!(
                            "{} photons per pulse is not a QKD source (max 20)",
                            c.mean_photons.get()
                        ),
                    ));
                }
            }
            for w in intensities.windows(2) {
                if w[1].mean_photons.get() > w[0].mean_photons.get() {
                    return Err(OpticsError::invalid(
                        "source.intensities",
                        "list classes from the strongest (signal) to the weakest",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The quantum channel between Alice and Bob.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Channel {
    /// Standard single-mode fibre.
    Fibre {
        /// Length in km.
        length_km: NonNegative,
        /// Attenuation in dB/km (0.2 for modern SMF-28 at 1550 nm).
        loss_db_per_km: NonNegative,
        /// Fixed extra loss (connectors, splices, filters) in dB.
        #[serde(default = "zero")]
        extra_loss_db: NonNegative,
    },
    /// A channel characterised only by its total loss.
    ConstantLoss {
        /// Total loss in dB.
        loss_db: NonNegative,
    },
    /// A free-space downlink from a low-Earth-orbit satellite; loss follows
    /// the pass geometry (see [`SatellitePass`]).
    Satellite(SatellitePass),
}

fn zero() -> NonNegative {
    // Invariant: 0 is in range.
    NonNegative::new(0.0).expect("0 is non-negative")
}

impl Channel {
    /// Channel loss in dB at the nominal operating point (for a satellite:
    /// at the pass's closest approach).
    pub fn loss_db(&self) -> f64 {
        match self {
            Channel::Fibre {
                length_km,
                loss_db_per_km,
                extra_loss_db,
            } => length_km.get() * loss_db_per_km.get() + extra_loss_db.get(),
            Channel::ConstantLoss { loss_db } => loss_db.get(),
            Channel::Satellite(p) => p.min_loss_db(),
        }
    }

    /// Channel transmittance at the nominal operating point.
    pub fn transmittance(&self) -> f64 {
        db_to_transmittance(self.loss_db())
    }

    /// The same channel at a different distance: the fibre length, or for a
    /// satellite the slant range. A constant-loss channel has no distance.
    pub fn at_distance(&self, km: f64) -> Result<(Channel, f64), OpticsError> {
        let d = NonNegative::new(km).map_err(|_| {
            OpticsError::invalid("distance", format!("must be a length >= 0 km, got {km}"))
        })?;
        match self {
            Channel::Fibre {
                loss_db_per_km,
                extra_loss_db,
                ..
            } => {
                let c = Channel::Fibre {
                    length_km: d,
                    loss_db_per_km: *loss_db_per_km,
                    extra_loss_db: *extra_loss_db,
                };
                let loss = c.loss_db();
                Ok((c, loss))
            }
            Channel::Satellite(p) => {
                let loss = p.loss_db_at_range(km)?;
                Ok((
                    Channel::ConstantLoss {
                        loss_db: NonNegative::new(loss)?,
                    },
                    loss,
                ))
            }
            Channel::ConstantLoss { .. } => Err(OpticsError::invalid(
                "distance",
                "this preset has a constant-loss channel: it has no length to vary",
            )),
        }
    }
}

/// Bob's receiver: basis choice and two threshold detectors (active basis choice).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Receiver {
    /// Overall detection efficiency of Bob's apparatus (optics × detector), η_Bob.
    pub efficiency: Probability,
    /// Dark-count (and background) probability per gate, per detector.
    pub dark_count_prob: Probability,
    /// Detector dead time after a click, in seconds (0 = none).
    #[serde(default = "zero")]
    pub dead_time_s: NonNegative,
    /// Probability that a click is followed by an afterpulse in the first gate
    /// after the dead time (0 = none).
    #[serde(default = "zero_p")]
    pub afterpulse_prob: Probability,
    /// Misalignment error: probability that a photon measured in the basis it
    /// was prepared in lands in the wrong detector, e_d.
    pub misalignment: Probability,
    /// Probability that Bob measures in the Z (key) basis.
    pub basis_prob_z: Probability,
}

fn zero_p() -> Probability {
    // Invariant: 0 is a probability.
    Probability::new(0.0).expect("0 is a probability")
}

/// An eavesdropper on the channel (simulation only).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Eve {
    /// No eavesdropper.
    #[default]
    None,
    /// Intercept-resend right after Alice on a fraction of pulses: Eve
    /// measures in a random basis and resends the same photon number prepared
    /// in her basis with her result, so gains stay as expected and errors appear.
    InterceptResend {
        /// Fraction of pulses attacked.
        fraction: Probability,
    },
    /// Photon-number splitting: Eve replaces the fibre by a lossless one, keeps
    /// one photon of every multi-photon pulse, forwards the rest, and blocks
    /// single photons so that the signal gain matches the honest channel.
    Pns,
}

impl Eve {
    /// Parses the command-line form: `none`, `intercept-resend:F`, `pns`.
    pub fn parse(s: &str) -> Result<Eve, OpticsError> {
        let bad = || {
            OpticsError::invalid(
                "eve",
                format!("expected 'none', 'pns' or 'intercept-resend:FRACTION', got '{s}'"),
            )
        };
        match s {
            "none" => Ok(Eve::None),
            "pns" => Ok(Eve::Pns),
            _ => {
                let f = s.strip_prefix("intercept-resend:").ok_or_else(bad)?;
                let f: f64 = f.parse().map_err(|_| bad())?;
                Ok(Eve::InterceptResend {
                    fraction: Probability::new(f).map_err(|_| {
                        OpticsError::invalid(
                            "eve",
                            format!("intercept-resend fraction must be in [0, 1], got {f}"),
                        )
                    })?,
                })
            }
        }
    }
}

/// What the key-rate models assume about post-processing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostprocAssumptions {
    /// Error-correction inefficiency f ≥ 1 (leaked bits = f · n · h(QBER)).
    pub ec_efficiency: f64,
    /// Secrecy parameter ε_sec of the finite-key analysis.
    pub eps_sec: Probability,
    /// Correctness parameter ε_cor.
    pub eps_cor: Probability,
}

/// A complete link: source, channel, receiver and post-processing assumptions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// Preset name.
    pub name: String,
    /// One line on what this is.
    pub description: String,
    /// Where the numbers come from (paper, table).
    pub reference: String,
    /// The transmitter.
    pub source: Source,
    /// The quantum channel.
    pub channel: Channel,
    /// Bob's receiver.
    pub receiver: Receiver,
    /// Post-processing assumptions for the models.
    pub postproc: PostprocAssumptions,
}

impl LinkConfig {
    /// Parses and validates a TOML link description.
    pub fn from_toml(text: &str) -> Result<LinkConfig, OpticsError> {
        let cfg: LinkConfig =
            toml::from_str(text).map_err(|e| OpticsError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Cross-field checks that the per-field types cannot express.
    pub fn validate(&self) -> Result<(), OpticsError> {
        self.source.validate()?;
        if let Channel::Satellite(p) = &self.channel {
            p.validate()?;
        }
        let f = self.postproc.ec_efficiency;
        if !(f.is_finite() && (1.0..=3.0).contains(&f)) {
            return Err(OpticsError::invalid(
                "postproc.ec_efficiency",
                format!("must be in [1, 3], got {f}"),
            ));
        }
        if self.postproc.eps_sec.get() <= 0.0 || self.postproc.eps_cor.get() <= 0.0 {
            return Err(OpticsError::invalid(
                "postproc.eps",
                "ε_sec and ε_cor must be > 0",
            ));
        }
        Ok(())
    }

    /// The same link with the channel set to `km` (fibre length or satellite range).
    pub fn at_distance(&self, km: f64) -> Result<LinkConfig, OpticsError> {
        let (channel, _) = self.channel.at_distance(km)?;
        Ok(LinkConfig {
            channel,
            ..self.clone()
        })
    }

    /// Total transmittance η = channel × receiver efficiency.
    pub fn total_transmittance(&self) -> f64 {
        self.channel.transmittance() * self.receiver.efficiency.get()
    }
}
