//! The clinical commands of `wardflow`: NEWS2 scoring, rule files,
//! patients, clinicians, manual observations and the alert log.

use std::io::{BufRead as _, Write as _};

use anyhow::bail;
use serde::Deserialize;
use wardflow_rules::news2::{Acvpu, News2Input, Oxygen, Spo2Scale};

/// One observation set as `wardflow news2` reads it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct News2Line {
    rr: f64,
    spo2: f64,
    #[serde(default = "scale_one")]
    spo2_scale: u8,
    oxygen: String,
    sbp: f64,
    hr: f64,
    consciousness: String,
    temp: f64,
}

fn scale_one() -> u8 {
    1
}

impl News2Line {
    fn input(&self) -> anyhow::Result<News2Input> {
        let Some(spo2_scale) = Spo2Scale::from_number(self.spo2_scale) else {
            bail!("spo2_scale must be 1 or 2, got {}", self.spo2_scale);
        };
        let Some(oxygen) = Oxygen::parse(&self.oxygen) else {
            bail!("oxygen must be \"air\" or \"o2\", got {:?}", self.oxygen);
        };
        let Some(consciousness) = Acvpu::parse(&self.consciousness) else {
            bail!(
                "consciousness must be one of A, C, V, P, U, got {:?}",
                self.consciousness
            );
        };
        for (name, v) in [
            ("rr", self.rr),
            ("spo2", self.spo2),
            ("sbp", self.sbp),
            ("hr", self.hr),
            ("temp", self.temp),
        ] {
            if !v.is_finite() {
                bail!("{name} must be a finite number");
            }
        }
        Ok(News2Input {
            rr: self.rr,
            spo2: self.spo2,
            spo2_scale,
            oxygen,
            sbp: self.sbp,
            hr: self.hr,
            consciousness,
            temp: self.temp,
        })
    }
}

/// `wardflow news2`: scores JSON Lines observation sets from stdin, one JSON
/// object per line on stdout. A line that cannot be scored gets
/// `{"line": N, "error": "..."}` and the command exits non-zero at the end.
pub fn news2() -> anyhow::Result<()> {
    let stdin = std::io::stdin().lock();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut failed = 0usize;
    for (i, line) in stdin.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let scored = serde_json::from_str::<News2Line>(&line)
            .map_err(anyhow::Error::from)
            .and_then(|l| l.input());
        let value = match scored {
            Ok(input) => {
                let s = input.score();
                serde_json::json!({
                    "total": s.total,
                    "scores": s.parts,
                    "red": s.red,
                    "risk": s.risk.name(),
                })
            }
            Err(e) => {
                failed += 1;
                serde_json::json!({"line": i + 1, "error": e.to_string()})
            }
        };
        serde_json::to_writer(&mut out, &value)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    if failed > 0 {
        bail!("{failed} observation sets could not be scored");
    }
    Ok(())
}
