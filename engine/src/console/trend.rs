//! `GET /v1/console/patients/{p}/trend?hours=1|8|24`: a patient's vitals
//! from the store, their alert transitions and manual observations over
//! the same span, and their NEWS2 once a minute, recomputed from the same
//! readings and observations with the rules' own NEWS2 (RCP 2017) code.

use std::collections::BTreeMap;

use ntex::web::{self, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;
use wardflow_model::{Metric, PatientId, Quality, Reading, now_ns};
use wardflow_rules::eval::PatientMonitor;
use wardflow_rules::spec::RuleSet;
use wardflow_storage::query::{ReadingQuery, read_readings};

use super::{Console, State};
use crate::api::error;

/// Points per series at most; beyond, each bucket keeps its minimum and
/// maximum, so a spike survives the thinning.
const MAX_POINTS: usize = 20_000;
/// How long a value counts towards the NEWS2 history.
const NEWS2_FRESHNESS_NS: i64 = 5 * 60 * 1_000_000_000;
const MINUTE_NS: i64 = 60_000_000_000;

#[derive(Deserialize)]
pub(super) struct TrendQuery {
    hours: Option<u32>,
}

pub(super) async fn trend(
    console: State,
    req: HttpRequest,
    patient: web::types::Path<String>,
    q: web::types::Query<TrendQuery>,
) -> HttpResponse {
    let s = match console.session(&req) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let hours = q.hours.unwrap_or(1);
    if ![1, 8, 24].contains(&hours) {
        return error(400, "hours is 1, 8 or 24");
    }
    let patient = patient.into_inner();
    if PatientId::new(&patient).is_err() {
        return error(400, "not a patient id");
    }
    let Some(via) = console.may_see(&s, &patient) else {
        return error(403, &format!("{} may not see patient {patient}", s.actor()));
    };
    console.record_view(
        &s,
        &patient,
        &via,
        "view",
        &format!("console: trends of the last {hours} h"),
    );
    let c = console.get_ref().clone();
    let to_ns = now_ns();
    let from_ns = to_ns - hours as i64 * 3_600_000_000_000;
    let (alerts, observations) = (via.shows("alerts"), via.shows("observations"));
    let answer = ntex::rt::spawn_blocking(move || {
        build(&c, &patient, from_ns, to_ns).map(|mut v| {
            // What an access does not cover stays out.
            if !alerts {
                v["alerts"] = json!([]);
            }
            if !observations {
                v["observations"] = json!([]);
            }
            v
        })
    })
    .await;
    match answer {
        Ok(Ok(v)) => super::ok_json(v),
        Ok(Err(e)) => error(500, &format!("{e:#}")),
        Err(_) => error(500, "the trend could not be read"),
    }
}

#[derive(Default)]
struct Series {
    t: Vec<i64>,
    v: Vec<f64>,
}

impl Series {
    /// Thins to at most [`MAX_POINTS`]: the minimum and maximum of each
    /// bucket, in time order.
    fn thinned(self) -> Series {
        if self.t.len() <= MAX_POINTS {
            return self;
        }
        let per = self.t.len().div_ceil(MAX_POINTS / 2);
        let mut out = Series::default();
        for start in (0..self.t.len()).step_by(per) {
            let end = (start + per).min(self.t.len());
            let (mut lo, mut hi) = (start, start);
            for i in start..end {
                if self.v[i] < self.v[lo] {
                    lo = i;
                }
                if self.v[i] > self.v[hi] {
                    hi = i;
                }
            }
            let (a, b) = if lo <= hi { (lo, hi) } else { (hi, lo) };
            out.t.push(self.t[a]);
            out.v.push(self.v[a]);
            if b != a {
                out.t.push(self.t[b]);
                out.v.push(self.v[b]);
            }
        }
        out
    }

    fn json(self) -> serde_json::Value {
        json!({ "t": self.t, "v": self.v })
    }
}

/// The rules the NEWS2 history is computed with: NEWS2 alone.
fn news2_rules() -> RuleSet {
    RuleSet::parse(
        std::path::Path::new("console NEWS2"),
        "[[rule]]\nid = \"news2\"\nnews2 = { freshness = \"5m\" }\n",
    )
    .expect("a NEWS2 rule parses")
}

fn build(
    console: &Console,
    patient: &str,
    from_ns: i64,
    to_ns: i64,
) -> anyhow::Result<serde_json::Value> {
    let data = &console.config.data_dir;
    // Values from before the span still count towards its first minutes.
    let q = ReadingQuery {
        patient: Some(patient.to_string()),
        from_ns: Some(from_ns - NEWS2_FRESHNESS_NS),
        to_ns: Some(to_ns),
        ..Default::default()
    };
    let mut answer = read_readings(data, console.keys.as_deref(), &q)?;
    answer.rows.sort_by_key(|r| r.time_ns);
    let observations: Vec<_> = wardflow_ingest::observations::ObservationTail::new(data)
        .poll()?
        .into_iter()
        .filter(|o| o.patient.as_str() == patient && o.time_ns <= to_ns)
        .collect();

    // NEWS2 each minute, from what was known at that minute.
    let rules = news2_rules();
    let applies = vec![true; rules.rules.len()];
    let mut monitor = PatientMonitor::new(&rules);
    let mut events = Vec::new();
    let mut news2 = Series::default();
    let (mut r, mut o) = (0, 0);
    let mut minute = from_ns - from_ns.rem_euclid(MINUTE_NS) + MINUTE_NS;
    while minute <= to_ns {
        while o < observations.len() && observations[o].time_ns <= minute {
            monitor.on_manual(&rules, &applies, observations[o].observation(), &mut events);
            o += 1;
        }
        while r < answer.rows.len() && answer.rows[r].time_ns <= minute {
            let row = &answer.rows[r];
            if let Some(metric) = Metric::from_name(&row.metric) {
                let reading = Reading {
                    time_ns: row.time_ns,
                    metric,
                    value: row.value,
                    seq: row.seq,
                    quality: Quality(row.quality),
                };
                monitor.on_reading(
                    &rules,
                    &applies,
                    &row.device,
                    row.received_ns,
                    &reading,
                    &mut events,
                );
            }
            r += 1;
        }
        events.clear();
        if let Some((score, _)) = monitor.news2(NEWS2_FRESHNESS_NS, minute) {
            news2.t.push(minute / 1_000_000);
            news2.v.push(score.total as f64);
        }
        minute += MINUTE_NS;
    }

    let mut series: BTreeMap<&'static str, Series> = BTreeMap::new();
    for row in answer.rows.iter().filter(|r| r.time_ns >= from_ns) {
        let Some(name) = super::TILE_METRICS
            .iter()
            .find(|(_, m)| m.name() == row.metric)
            .map(|(n, _)| *n)
        else {
            continue;
        };
        let s = series.entry(name).or_default();
        s.t.push(row.time_ns / 1_000_000);
        s.v.push(row.value);
    }
    let series: serde_json::Map<String, serde_json::Value> = series
        .into_iter()
        .map(|(k, s)| (k.to_string(), s.thinned().json()))
        .collect();
    let alerts: Vec<_> = crate::alerting::read_log(data)?
        .into_iter()
        .filter(|a| a.patient.as_deref() == Some(patient) && a.at_ns >= from_ns && a.at_ns <= to_ns)
        .collect();
    let observations: Vec<_> = observations
        .iter()
        .filter(|o| o.time_ns >= from_ns)
        .map(|o| {
            json!({
                "t": o.time_ns / 1_000_000,
                "consciousness": o.consciousness.map(|c| c.letter()),
                "oxygen": o.oxygen,
                "spo2_scale": o.spo2_scale.map(|s| match s {
                    wardflow_rules::news2::Spo2Scale::One => 1,
                    wardflow_rules::news2::Spo2Scale::Two => 2,
                }),
                "by": o.by,
            })
        })
        .collect();
    Ok(json!({
        "patient": patient,
        "from": from_ns / 1_000_000,
        "to": to_ns / 1_000_000,
        "series": series,
        "news2": news2.json(),
        "alerts": alerts,
        "observations": observations,
        "withheld": answer.withheld.iter().map(|w| w.to_string()).collect::<Vec<_>>(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thinning_keeps_extremes_and_order() {
        let n = MAX_POINTS * 5;
        let mut s = Series::default();
        for i in 0..n {
            s.t.push(i as i64);
            s.v.push(if i == 12_345 {
                250.0
            } else {
                80.0 + (i % 7) as f64
            });
        }
        let t = s.thinned();
        assert!(t.t.len() <= MAX_POINTS + 2);
        assert!(t.t.windows(2).all(|w| w[0] <= w[1]));
        assert!(t.v.contains(&250.0), "the spike survives");
        assert_eq!(t.v.iter().cloned().fold(f64::MAX, f64::min), 80.0);
    }

    #[test]
    fn the_news2_rules_parse() {
        assert_eq!(news2_rules().rules.len(), 1);
    }
}
