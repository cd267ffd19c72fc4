//! A low-Earth-orbit downlink: loss over a pass from geometry.
//!
//! Loss in dB = diffraction (beam of full divergence θ spread over slant range
//! R, caught by a telescope of diameter D: 20·log10(θR/D) when the beam is the
//! larger) + atmosphere (zenith attenuation / sin elevation) + a fixed term
//! (pointing, telescope and receiver optics). The pass is a circular orbit over
//! a spherical, non-rotating Earth, parameterised by its culmination elevation:
//! simple enough to check by hand, close enough to reproduce the loss-versus-range
//! curve reported for Micius (see `presets/micius2017.toml`).

use serde::{Deserialize, Serialize};

use crate::OpticsError;
use crate::units::{NonNegative, Positive};

const EARTH_RADIUS_KM: f64 = 6371.0;
const GM_KM3_S2: f64 = 398_600.4418;

/// Orbit, pass and link-budget parameters of a satellite downlink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SatellitePass {
    /// Orbit altitude in km.
    pub altitude_km: Positive,
    /// Highest elevation reached in the pass, degrees.
    pub max_elevation_deg: Positive,
    /// Lowest elevation at which the link is used, degrees.
    pub min_elevation_deg: Positive,
    /// Full-angle far-field beam divergence in µrad.
    pub divergence_urad: Positive,
    /// Receiving telescope aperture in m.
    pub aperture_m: Positive,
    /// Atmospheric attenuation at zenith in dB.
    pub atmosphere_zenith_db: NonNegative,
    /// Fixed losses (pointing, optics, coupling) in dB.
    pub fixed_loss_db: NonNegative,
}

/// One instant of a pass.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PassPoint {
    /// Seconds from culmination (negative: rising).
    pub t_s: f64,
    /// Slant range in km.
    pub range_km: f64,
    /// Elevation in degrees.
    pub elevation_deg: f64,
    /// Channel loss in dB.
    pub loss_db: f64,
}

impl SatellitePass {
    fn orbit_radius(&self) -> f64 {
        EARTH_RADIUS_KM + self.altitude_km.get()
    }

    /// Checks the pass geometry.
    pub fn validate(&self) -> Result<(), OpticsError> {
        let (lo, hi) = (self.min_elevation_deg.get(), self.max_elevation_deg.get());
        if !(lo < hi && hi <= 90.0) {
            return Err(OpticsError::invalid(
                "channel elevations",
                format!("need 0 < min_elevation_deg ({lo}) < max_elevation_deg ({hi}) <= 90"),
            ));
        }
        Ok(())
    }

    /// Elevation (degrees) at which the satellite is seen at slant range `range_km`.
    pub fn elevation_at_range(&self, range_km: f64) -> Result<f64, OpticsError> {
        let (re, r) = (EARTH_RADIUS_KM, self.orbit_radius());
        let s = (r * r - re * re - range_km * range_km) / (2.0 * re * range_km);
        if !(range_km >= self.altitude_km.get() - 1e-9) || !(0.0..=1.0 + 1e-12).contains(&s) {
            return Err(OpticsError::invalid(
                "distance",
                format!(
                    "a satellite at {} km altitude is not above the horizon at {range_km} km slant range",
                    self.altitude_km.get()
                ),
            ));
        }
        Ok(s.min(1.0).asin().to_degrees())
    }

    /// Loss in dB at a given slant range and elevation.
    pub fn loss_db(&self, range_km: f64, elevation_deg: f64) -> f64 {
        let beam_m = self.divergence_urad.get() * 1e-6 * range_km * 1e3;
        let geo = (20.0 * (beam_m / self.aperture_m.get()).log10()).max(0.0);
        let atm = self.atmosphere_zenith_db.get() / elevation_deg.to_radians().sin().max(1e-3);
        geo + atm + self.fixed_loss_db.get()
    }

    /// Loss in dB at a slant range (elevation from geometry).
    pub fn loss_db_at_range(&self, range_km: f64) -> Result<f64, OpticsError> {
        let el = self.elevation_at_range(range_km)?;
        Ok(self.loss_db(range_km, el))
    }

    fn range_at_central_angle(&self, gamma: f64) -> (f64, f64) {
        let (re, r) = (EARTH_RADIUS_KM, self.orbit_radius());
        let range = (re * re + r * r - 2.0 * re * r * gamma.cos()).sqrt();
        let sin_el = (r * gamma.cos() - re) / range;
        (range, sin_el.clamp(-1.0, 1.0).asin().to_degrees())
    }

    fn central_angle_for_elevation(&self, el_deg: f64) -> f64 {
        // elevation decreases monotonically with central angle: bisect
        let (mut lo, mut hi) = (0.0f64, std::f64::consts::FRAC_PI_2);
        for _ in 0..100 {
            let mid = 0.5 * (lo + hi);
            if self.range_at_central_angle(mid).1 > el_deg {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        0.5 * (lo + hi)
    }

    /// Loss at closest approach.
    pub fn min_loss_db(&self) -> f64 {
        let (range, el) = self
            .range_at_central_angle(self.central_angle_for_elevation(self.max_elevation_deg.get()));
        self.loss_db(range, el)
    }

    /// Duration of the usable pass in seconds.
    pub fn duration_s(&self) -> f64 {
        let beta = self.central_angle_for_elevation(self.max_elevation_deg.get());
        let gmin = self.central_angle_for_elevation(self.min_elevation_deg.get());
        let omega = (GM_KM3_S2 / self.orbit_radius().powi(3)).sqrt();
        // cos γ = cos β cos(ωt)
        let c = (gmin.cos() / beta.cos()).clamp(-1.0, 1.0);
        2.0 * c.acos() / omega
    }

    /// The pass sampled every `step_s` seconds, rising to setting.
    pub fn profile(&self, step_s: f64) -> Vec<PassPoint> {
        let beta = self.central_angle_for_elevation(self.max_elevation_deg.get());
        let omega = (GM_KM3_S2 / self.orbit_radius().powi(3)).sqrt();
        let half = self.duration_s() / 2.0;
        let step = step_s.max(1e-3);
        let n = (2.0 * half / step).floor() as usize;
        (0..=n)
            .map(|i| {
                let t = -half + i as f64 * step;
                let gamma = (beta.cos() * (omega * t).cos()).clamp(-1.0, 1.0).acos();
                let (range_km, elevation_deg) = self.range_at_central_angle(gamma);
                PassPoint {
                    t_s: t,
                    range_km,
                    elevation_deg,
                    loss_db: self.loss_db(range_km, elevation_deg),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micius_like() -> SatellitePass {
        SatellitePass {
            altitude_km: Positive::new(500.0).unwrap(),
            max_elevation_deg: Positive::new(80.0).unwrap(),
            min_elevation_deg: Positive::new(10.0).unwrap(),
            divergence_urad: Positive::new(10.0).unwrap(),
            aperture_m: Positive::new(1.0).unwrap(),
            atmosphere_zenith_db: NonNegative::new(3.0).unwrap(),
            fixed_loss_db: NonNegative::new(3.0).unwrap(),
        }
    }

    #[test]
    fn zenith_geometry() {
        let p = micius_like();
        assert!((p.elevation_at_range(500.0).unwrap() - 90.0).abs() < 1e-6);
        assert!(p.elevation_at_range(100.0).is_err());
        assert!(p.elevation_at_range(5000.0).is_err());
    }

    #[test]
    fn pass_is_symmetric_and_lasts_minutes() {
        let p = micius_like();
        let d = p.duration_s();
        assert!(d > 300.0 && d < 900.0, "{d}");
        let prof = p.profile(1.0);
        let first = prof.first().unwrap();
        let last = prof.last().unwrap();
        assert!((first.elevation_deg - last.elevation_deg).abs() < 0.5);
        assert!(
            (first.elevation_deg - 10.0).abs() < 0.5,
            "{}",
            first.elevation_deg
        );
        let top = prof.iter().map(|x| x.elevation_deg).fold(0.0, f64::max);
        assert!((top - 80.0).abs() < 0.5);
        // loss is lowest at culmination
        let min_loss = prof.iter().map(|x| x.loss_db).fold(f64::INFINITY, f64::min);
        assert!((min_loss - p.min_loss_db()).abs() < 0.1);
    }
}
