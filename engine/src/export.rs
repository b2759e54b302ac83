//! `wardflow export`: a patient's data as a FHIR R4 Bundle, or as CSV or
//! Parquet tables for analysts. This is also the patient's right of access,
//! so the export holds the patient's alerts and the access log (with each
//! access's proof status in the audit trail) beside the readings, and is
//! itself recorded in the audit trail as an access.
//!
//! Gathering lives here (the store, the alert log, the audit trail); the
//! conversion is `wardflow_storage::export`'s.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use wardflow_ledger_bridge::events::AccessRequest;
use wardflow_model::{PatientId, TimestampNs};
use wardflow_rules::Priority;
use wardflow_rules::alarm::{Alert, AlertEventKind, AlertState};
use wardflow_storage::export::{self, AlertRow, AlertValue, ExportMeta};
use wardflow_storage::query::{ReadingQuery, query_readings};

use crate::config::Config;
use crate::output::parse_time;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// One FHIR R4 Bundle (JSON): Observations, DetectedIssues, AuditEvents
    Fhir,
    /// readings.csv, alerts.csv and access.csv in the --out directory
    Csv,
    /// readings.parquet, alerts.parquet and access.parquet in the --out directory
    Parquet,
}

impl ExportFormat {
    fn name(self) -> &'static str {
        match self {
            ExportFormat::Fhir => "fhir",
            ExportFormat::Csv => "csv",
            ExportFormat::Parquet => "parquet",
        }
    }
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The patient whose data is exported
    #[arg(long)]
    pub patient: String,
    /// Readings and alerts from this time (RFC 3339, a date, now, or -15m / -2h / -1d);
    /// the access log is always whole
    #[arg(long, allow_hyphen_values = true)]
    pub from: Option<String>,
    /// Up to (not including) this time
    #[arg(long, allow_hyphen_values = true)]
    pub to: Option<String>,
    #[arg(long, value_enum, default_value_t = ExportFormat::Fhir)]
    pub format: ExportFormat,
    /// FHIR: the bundle's file [default: stdout]; CSV and Parquet: the directory to write into
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
    /// Who is exporting, for the patient's access log [default: cli:$USER]
    #[arg(long = "as", value_name = "ACTOR")]
    pub actor: Option<String>,
    /// Why: patient-request (the patient's right of access), treatment, research:<study>, ...
    #[arg(long, default_value = "patient-request")]
    pub purpose: String,
}

/// `wardflow export`.
pub fn run(config: &Config, args: &ExportArgs) -> anyhow::Result<()> {
    PatientId::new(&args.patient).context("--patient")?;
    let from_ns = args
        .from
        .as_deref()
        .map(|s| parse_time("--from", s))
        .transpose()?;
    let to_ns = args
        .to
        .as_deref()
        .map(|s| parse_time("--to", s))
        .transpose()?;
    if let (Some(f), Some(t)) = (from_ns, to_ns)
        && f >= t
    {
        bail!("--from must be before --to");
    }
    if args.format != ExportFormat::Fhir && args.out.is_none() {
        bail!(
            "--format {} writes three files: give the directory with --out DIR",
            args.format.name()
        );
    }
    let data_dir = &config.data_dir;
    let readings = query_readings(
        data_dir,
        &ReadingQuery {
            patient: Some(args.patient.clone()),
            from_ns,
            to_ns,
            ..Default::default()
        },
    )?;
    let alerts = patient_alerts(
        crate::alerting::read_log(data_dir)?,
        &args.patient,
        from_ns,
        to_ns,
    );

    // No export of a patient's data without its record in the audit
    // trail; recorded before the access log is read, so the export lists
    // itself.
    let actor = args.actor.clone().unwrap_or_else(|| {
        format!(
            "cli:{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
        )
    });
    let mut detail = vec![
        args.format.name().to_string(),
        format!("{} readings", readings.len()),
        format!("{} alerts", alerts.len()),
    ];
    for (k, v) in [("from", &args.from), ("to", &args.to)] {
        if let Some(v) = v {
            detail.push(format!("{k}={v}"));
        }
    }
    let now = wardflow_model::now_ns();
    let request = AccessRequest::new(
        now,
        &args.patient,
        &actor,
        "export",
        &args.purpose,
        &detail.join(" "),
    );
    request
        .submit(&config.ledger_dir())
        .context("recording the access in the audit trail")?;
    let access = crate::verify::access_log(config, &args.patient)?;

    let written = match args.format {
        ExportFormat::Fhir => {
            let meta = ExportMeta {
                patient: args.patient.clone(),
                bundle_id: export::random_uuid(random_bytes()?),
                generated_ns: now,
            };
            let bundle = export::fhir_bundle(&meta, &readings, &alerts, &access);
            match &args.out {
                Some(path) => {
                    write_file(path, &export::to_json_pretty(&bundle))?;
                    path.display().to_string()
                }
                None => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&export::to_json_pretty(&bundle))?;
                    out.flush()?;
                    "stdout".into()
                }
            }
        }
        ExportFormat::Csv | ExportFormat::Parquet => {
            let dir = args.out.as_deref().expect("checked above");
            let tables = export::tables(&readings, &alerts, &access);
            let files = export::write_tables(dir, &tables, args.format == ExportFormat::Parquet)?;
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    eprintln!(
        "exported {} readings, {} alerts and {} accesses of patient {} to {written}",
        readings.len(),
        alerts.len(),
        access.len(),
        args.patient
    );
    Ok(())
}

fn random_bytes() -> anyhow::Result<[u8; 16]> {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| anyhow::anyhow!("no randomness"))?;
    Ok(b)
}

/// Writes a file whole: a temporary beside it, then renamed over it.
fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn priority_name(p: Priority) -> &'static str {
    match p {
        Priority::High => "high",
        Priority::Medium => "medium",
        Priority::Low => "low",
    }
}

/// The patient's alerts from the alert log's transitions, one row per
/// alert: those open at some time in [from, to) (raised before `to`, not
/// resolved before `from`), in the order they were raised.
fn patient_alerts(
    records: Vec<Alert>,
    patient: &str,
    from_ns: Option<TimestampNs>,
    to_ns: Option<TimestampNs>,
) -> Vec<AlertRow> {
    let mut by_id: BTreeMap<String, Vec<Alert>> = BTreeMap::new();
    for a in records {
        if a.patient.as_deref() == Some(patient) {
            by_id.entry(a.id.clone()).or_default().push(a);
        }
    }
    let mut rows: Vec<AlertRow> = by_id
        .into_values()
        .filter_map(|mut transitions| {
            transitions.sort_by_key(|a| a.seq);
            // A transition logged twice (replayed after a restart) counts once.
            transitions.dedup_by_key(|a| a.seq);
            let last = transitions.last()?;
            let ack = transitions
                .iter()
                .rev()
                .find(|a| a.event == AlertEventKind::Acknowledged);
            let resolved = transitions
                .iter()
                .find(|a| a.state == AlertState::Resolved)
                .map(|a| a.at_ns);
            Some(AlertRow {
                id: last.id.clone(),
                rule: last.rule.clone(),
                description: last.description.clone(),
                priority: priority_name(last.priority).into(),
                state: last.state.name().into(),
                technical: last.technical,
                device: last.device.clone(),
                first_reading_ns: last.first_reading_ns,
                raised_ns: last.raised_ns,
                updated_ns: last.at_ns,
                acknowledged_ns: ack.map(|a| a.at_ns),
                acknowledged_by: ack.and_then(|a| a.by.clone()),
                resolved_ns: resolved,
                values: last
                    .values
                    .iter()
                    .map(|v| AlertValue {
                        name: v.name.clone(),
                        value: v.value,
                        time_ns: v.time_ns,
                        note: v.note.clone(),
                    })
                    .collect(),
            })
        })
        .filter(|a| {
            to_ns.is_none_or(|t| a.raised_ns < t)
                && from_ns.is_none_or(|f| a.resolved_ns.is_none_or(|r| r >= f))
        })
        .collect();
    rows.sort_by(|a, b| (a.raised_ns, &a.id).cmp(&(b.raised_ns, &b.id)));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use wardflow_rules::alarm::SubjectKind;

    fn transition(
        id: &str,
        seq: u32,
        event: AlertEventKind,
        state: AlertState,
        at_ns: i64,
    ) -> Alert {
        Alert {
            id: id.into(),
            seq,
            event,
            state,
            subject: "p-1".into(),
            subject_kind: SubjectKind::Patient,
            patient: Some("p-1".into()),
            device: Some("mon-1".into()),
            unit: None,
            bed: None,
            rule: "spo2-low".into(),
            description: "SpO2 low".into(),
            priority: Priority::High,
            base_priority: Priority::High,
            technical: false,
            tier: 1,
            latching: false,
            condition: true,
            values: vec![],
            first_reading_ns: 5,
            raised_ns: 10,
            at_ns,
            by: (event == AlertEventKind::Acknowledged).then(|| "rn-a".into()),
            silenced_until_ns: None,
            escalation_clock_ns: 10,
            escalate_after_ns: None,
        }
    }

    #[test]
    fn transitions_fold_into_one_row_per_alert() {
        let mut other = transition("b", 1, AlertEventKind::Raised, AlertState::Active, 10);
        other.patient = Some("p-2".into());
        let records = vec![
            transition("a", 1, AlertEventKind::Raised, AlertState::Active, 10),
            transition(
                "a",
                2,
                AlertEventKind::Acknowledged,
                AlertState::Acknowledged,
                20,
            ),
            transition(
                "a",
                2,
                AlertEventKind::Acknowledged,
                AlertState::Acknowledged,
                20,
            ),
            transition("a", 3, AlertEventKind::Resolved, AlertState::Resolved, 30),
            other,
        ];
        let rows = patient_alerts(records.clone(), "p-1", None, None);
        assert_eq!(rows.len(), 1);
        let a = &rows[0];
        assert_eq!(
            (a.state.as_str(), a.priority.as_str()),
            ("resolved", "high")
        );
        assert_eq!(a.acknowledged_ns, Some(20));
        assert_eq!(a.acknowledged_by.as_deref(), Some("rn-a"));
        assert_eq!(
            (a.raised_ns, a.resolved_ns, a.updated_ns),
            (10, Some(30), 30)
        );
        // Open during the range: kept; resolved before it or raised after: not.
        assert_eq!(
            patient_alerts(records.clone(), "p-1", Some(30), None).len(),
            1
        );
        assert!(patient_alerts(records.clone(), "p-1", Some(31), None).is_empty());
        assert!(patient_alerts(records, "p-1", None, Some(10)).is_empty());
    }
}
