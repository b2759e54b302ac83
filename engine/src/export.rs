//! `wardflow export`: a patient's data as a FHIR R4 Bundle, or as CSV or
//! Parquet tables for analysts. This is also the patient's right of access,
//! so the export holds the patient's alerts and the access log (with each
//! access's proof status in the audit trail) beside the readings, and is
//! itself recorded in the audit trail as an access.
//!
//! Gathering lives here (the store, the alert log, the audit trail); the
//! conversion is `wardflow_storage::export`'s.

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use tempfile::NamedTempFile;
use wardflow_ledger_bridge::events::AccessRequest;
use wardflow_model::{PatientId, TimestampNs};
use wardflow_rules::Priority;
use wardflow_rules::alarm::{Alert, AlertEventKind, AlertState};
use wardflow_storage::export::{
    self, AccessRow, AlertRow, AlertValue, ExportMeta, FhirWriter, TableFile,
};
use wardflow_storage::layout;
use wardflow_storage::query::{ReadingQuery, StoredReading, read_readings};

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
    let alerts = patient_alerts(
        crate::alerting::read_log(data_dir)?,
        &args.patient,
        from_ns,
        to_ns,
    );
    let now = wardflow_model::now_ns();
    let meta = ExportMeta {
        patient: args.patient.clone(),
        bundle_id: export::random_uuid(random_bytes()?),
        generated_ns: now,
    };
    let mut sink = Sink::open(args, meta, &alerts)?;
    // Hour by hour, as the store partitions: memory for one hour of the
    // patient's readings, however long the export.
    let keys = config.keyring_to_read()?;
    let mut readings = 0;
    let mut withheld: Vec<wardflow_storage::query::Withheld> = Vec::new();
    for (lo, hi) in hour_windows(data_dir, from_ns, to_ns)? {
        let chunk = read_readings(
            data_dir,
            keys.as_deref(),
            &ReadingQuery {
                patient: Some(args.patient.clone()),
                from_ns: Some(lo),
                to_ns: Some(hi),
                ..Default::default()
            },
        )?;
        readings += chunk.rows.len();
        sink.readings(&chunk.rows)?;
        for w in chunk.withheld {
            match withheld.iter_mut().find(|x| x.reason == w.reason) {
                Some(x) => x.rows += w.rows,
                None => withheld.push(w),
            }
        }
    }
    // Readings that could not be read (erased) are left out, and said so.
    crate::cli::report_withheld(&withheld);

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
        format!("{readings} readings"),
        format!("{} alerts", alerts.len()),
    ];
    for (k, v) in [("from", &args.from), ("to", &args.to)] {
        if let Some(v) = v {
            detail.push(format!("{k}={v}"));
        }
    }
    AccessRequest::new(
        now,
        &args.patient,
        &actor,
        "export",
        &args.purpose,
        &detail.join(" "),
    )
    .submit(&config.ledger_dir())
    .context("recording the access in the audit trail")?;
    let access = crate::verify::access_log(config, &args.patient)?;
    let written = sink.finish(&alerts, &access)?;
    eprintln!(
        "exported {readings} readings, {} alerts and {} accesses of patient {} to {written}",
        alerts.len(),
        access.len(),
        args.patient
    );
    Ok(())
}

/// `[from, to)` cut at the hours the store has readings in.
fn hour_windows(
    data_dir: &Path,
    from_ns: Option<TimestampNs>,
    to_ns: Option<TimestampNs>,
) -> anyhow::Result<Vec<(TimestampNs, TimestampNs)>> {
    let table = data_dir.join(layout::READINGS_DIR);
    let hours = layout::partitions(&table).with_context(|| format!("{}", table.display()))?;
    Ok(hours
        .into_iter()
        .map(|(h, _)| layout::hour_bounds(h))
        .map(|(s, e)| {
            (
                from_ns.map_or(s, |f| f.max(s)),
                to_ns.map_or(e, |t| t.min(e)),
            )
        })
        .filter(|(s, e)| s < e)
        .collect())
}

/// Where an export goes.
enum Sink {
    /// A bundle file, written beside its place and renamed into it.
    File(FhirWriter<BufWriter<NamedTempFile>>, PathBuf),
    Stdout(FhirWriter<BufWriter<std::io::Stdout>>),
    /// The directory, and the readings table being written.
    Tables(PathBuf, Box<TableFile>, bool),
}

impl Sink {
    fn open(args: &ExportArgs, meta: ExportMeta, alerts: &[AlertRow]) -> anyhow::Result<Sink> {
        Ok(match (args.format, &args.out) {
            (ExportFormat::Fhir, Some(path)) => {
                let dir = match path.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                let tmp = NamedTempFile::new_in(dir)
                    .with_context(|| format!("writing {}", path.display()))?;
                let w = FhirWriter::begin(BufWriter::new(tmp), meta, alerts)
                    .with_context(|| format!("writing {}", path.display()))?;
                Sink::File(w, path.clone())
            }
            (ExportFormat::Fhir, None) => Sink::Stdout(FhirWriter::begin(
                BufWriter::new(std::io::stdout()),
                meta,
                alerts,
            )?),
            (format, dir) => {
                let dir = dir.clone().expect("checked before");
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let parquet = format == ExportFormat::Parquet;
                let readings = TableFile::create(&dir, &export::readings_table(&[]), parquet)?;
                Sink::Tables(dir, Box::new(readings), parquet)
            }
        })
    }

    fn readings(&mut self, chunk: &[StoredReading]) -> anyhow::Result<()> {
        match self {
            Sink::File(w, path) => w
                .readings(chunk)
                .with_context(|| format!("writing {}", path.display()))?,
            Sink::Stdout(w) => w.readings(chunk)?,
            Sink::Tables(_, t, _) => t.write(&export::readings_table(chunk))?,
        }
        Ok(())
    }

    /// Writes the alerts and the access log, completes the files; says where.
    fn finish(self, alerts: &[AlertRow], access: &[AccessRow]) -> anyhow::Result<String> {
        match self {
            Sink::File(w, path) => {
                let ctx = || format!("writing {}", path.display());
                let tmp = w
                    .finish(alerts, access)
                    .with_context(ctx)?
                    .into_inner()
                    .map_err(|e| e.into_error())
                    .with_context(ctx)?;
                tmp.as_file().sync_all().with_context(ctx)?;
                tmp.persist(&path).with_context(ctx)?;
                Ok(path.display().to_string())
            }
            Sink::Stdout(w) => {
                w.finish(alerts, access)?;
                Ok("stdout".into())
            }
            Sink::Tables(dir, readings, parquet) => {
                let mut files = vec![readings.finish()?];
                for t in [export::alerts_table(alerts), export::access_table(access)] {
                    files.extend(export::write_tables(&dir, &[t], parquet)?);
                }
                Ok(files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "))
            }
        }
    }
}

fn random_bytes() -> anyhow::Result<[u8; 16]> {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| anyhow::anyhow!("no randomness"))?;
    Ok(b)
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
