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

// ---- patients, clinicians, observations, alerts, rules ----

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use wardflow_ingest::census::{Admins, Census, Clinicians, Sex};
use wardflow_ingest::observations::{self, ObservationBody};
use wardflow_model::{PatientId, now_ns};
use wardflow_rules::alarm::Alert;
use wardflow_rules::spec::RuleSet;

use crate::output::{Format, Rows, format_time};

#[derive(Subcommand, Debug)]
pub enum PatientsCommand {
    /// Admit a patient to a unit and bed
    Admit {
        patient: String,
        #[arg(long)]
        unit: String,
        #[arg(long)]
        bed: String,
        #[arg(long)]
        age_years: Option<u16>,
        #[arg(long, value_enum)]
        sex: Option<SexArg>,
    },
    /// Move an admitted patient to another unit or bed
    Transfer {
        patient: String,
        #[arg(long)]
        unit: String,
        #[arg(long)]
        bed: String,
    },
    /// Discharge a patient: their open alerts resolve
    Discharge { patient: String },
    /// List admitted patients
    List {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Erase a patient's stored data by destroying their data key (crypto-shredding; needs --master-key)
    Erase {
        patient: String,
        /// Why (recorded on the audit trail), e.g. "the patient's request of 2026-11-20"
        #[arg(long)]
        reason: String,
        /// Who erases, for the audit trail [default: cli:$USER]
        #[arg(long)]
        by: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SexArg {
    F,
    M,
    X,
}

#[derive(Subcommand, Debug)]
pub enum CliniciansCommand {
    /// Add a clinician covering units; prints a generated secret unless --secret is given
    Add {
        id: String,
        /// Units covered, comma-separated
        #[arg(long, value_delimiter = ',', required = true)]
        units: Vec<String>,
        #[arg(long)]
        secret: Option<String>,
    },
    /// List clinicians
    List {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Remove a clinician
    Remove { id: String },
}

#[derive(Subcommand, Debug)]
pub enum AdminsCommand {
    /// Add a console administrator (every unit, every device); prints a generated secret unless --secret is given
    Add {
        id: String,
        #[arg(long)]
        secret: Option<String>,
    },
    /// List administrators
    List {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Remove an administrator
    Remove { id: String },
}

#[derive(Args, Debug)]
pub struct ObserveArgs {
    pub patient: String,
    /// Level of consciousness (ACVPU): A, C (new confusion), V, P or U
    #[arg(long)]
    pub consciousness: Option<String>,
    /// Breathing air or receiving supplemental oxygen: air or o2
    #[arg(long)]
    pub oxygen: Option<String>,
    /// NEWS2 SpO2 scale: 1, or 2 for hypercapnic respiratory failure (prescribed)
    #[arg(long)]
    pub spo2_scale: Option<u8>,
    /// Who observed
    #[arg(long, default_value = "cli")]
    pub by: String,
}

#[derive(Subcommand, Debug)]
pub enum AlertsCommand {
    /// List alerts (their latest state), newest first
    List {
        #[arg(long)]
        patient: Option<String>,
        #[arg(long)]
        unit: Option<String>,
        /// Only alerts not resolved
        #[arg(long)]
        active: bool,
        /// Every transition instead of the latest state
        #[arg(long)]
        history: bool,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

#[derive(Subcommand, Debug)]
pub enum RulesCommand {
    /// Check rule files; prints each error with file, line and field
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the built-in adult ICU rule set (a starting point for --rules)
    Default,
}

pub fn patients(dir: &Path, cmd: &PatientsCommand) -> anyhow::Result<()> {
    match cmd {
        PatientsCommand::Admit {
            patient,
            unit,
            bed,
            age_years,
            sex,
        } => {
            let p = PatientId::new(patient).context("patient")?;
            let sex = sex.map(|s| match s {
                SexArg::F => Sex::F,
                SexArg::M => Sex::M,
                SexArg::X => Sex::X,
            });
            let a = Census::admit(dir, p, unit, bed, *age_years, sex)?;
            println!("patient {} admitted to {} bed {}", a.patient, a.unit, a.bed);
        }
        PatientsCommand::Transfer { patient, unit, bed } => {
            let a = Census::transfer(dir, patient, unit, bed)?;
            println!("patient {} moved to {} bed {}", a.patient, a.unit, a.bed);
        }
        PatientsCommand::Discharge { patient } => {
            let a = Census::discharge(dir, patient)?;
            println!(
                "patient {} discharged from {} bed {}",
                a.patient, a.unit, a.bed
            );
        }
        PatientsCommand::Erase { .. } => {
            unreachable!("erasure needs the configuration; the CLI routes it to keys::erase")
        }
        PatientsCommand::List { format } => {
            let c = Census::load(dir)?;
            let rows: Vec<_> = c.patients.values().collect();
            let text = Rows {
                header: vec!["patient", "unit", "bed", "age", "sex", "admitted", "since"],
                rows: rows
                    .iter()
                    .map(|a| {
                        vec![
                            a.patient.to_string(),
                            a.unit.clone(),
                            a.bed.clone(),
                            a.age_years.map(|x| x.to_string()).unwrap_or_default(),
                            a.sex.map(|s| format!("{s:?}")).unwrap_or_default(),
                            format_time(a.admitted_ns),
                            format_time(a.since_ns),
                        ]
                    })
                    .collect(),
            };
            crate::cli::print_rows(*format, &text, &rows)?;
        }
    }
    Ok(())
}

pub fn clinicians(dir: &Path, cmd: &CliniciansCommand) -> anyhow::Result<()> {
    match cmd {
        CliniciansCommand::Add { id, units, secret } => {
            let s = Clinicians::add(dir, id, units, secret.clone())?;
            println!("clinician {id} covers {}", units.join(", "));
            if secret.is_none() {
                println!("secret: {s}");
                println!("HTTP bearer token: {id}:{s}");
                eprintln!("(shown once: only a salted hash is stored)");
            }
        }
        CliniciansCommand::List { format } => {
            #[derive(Serialize)]
            struct Row<'a> {
                id: &'a str,
                units: String,
                added: String,
            }
            let c = Clinicians::load(dir)?;
            let rows: Vec<Row> = c
                .clinicians
                .values()
                .map(|c| Row {
                    id: &c.id,
                    units: c.units.join(","),
                    added: format_time(c.added_ns),
                })
                .collect();
            let text = Rows {
                header: vec!["clinician", "units", "added"],
                rows: rows
                    .iter()
                    .map(|r| vec![r.id.into(), r.units.clone(), r.added.clone()])
                    .collect(),
            };
            crate::cli::print_rows(*format, &text, &rows)?;
        }
        CliniciansCommand::Remove { id } => {
            Clinicians::remove(dir, id)?;
            println!("clinician {id} removed");
        }
    }
    Ok(())
}

pub fn admins(dir: &Path, cmd: &AdminsCommand) -> anyhow::Result<()> {
    match cmd {
        AdminsCommand::Add { id, secret } => {
            let s = Admins::add(dir, id, secret.clone())?;
            println!("administrator {id} added");
            if secret.is_none() {
                println!("secret: {s}");
                eprintln!("(shown once: only a salted hash is stored)");
            }
        }
        AdminsCommand::List { format } => {
            #[derive(Serialize)]
            struct Row<'a> {
                id: &'a str,
                added: String,
            }
            let a = Admins::load(dir)?;
            let rows: Vec<Row> = a
                .admins
                .values()
                .map(|a| Row {
                    id: &a.id,
                    added: format_time(a.added_ns),
                })
                .collect();
            let text = Rows {
                header: vec!["administrator", "added"],
                rows: rows
                    .iter()
                    .map(|r| vec![r.id.into(), r.added.clone()])
                    .collect(),
            };
            crate::cli::print_rows(*format, &text, &rows)?;
        }
        AdminsCommand::Remove { id } => {
            Admins::remove(dir, id)?;
            println!("administrator {id} removed");
        }
    }
    Ok(())
}

pub fn observe(dir: &Path, args: &ObserveArgs) -> anyhow::Result<()> {
    let census = Census::load(dir)?;
    let Some(adm) = census.get(&args.patient) else {
        bail!(
            "patient {} is not admitted (wardflow patients admit)",
            args.patient
        );
    };
    let record = ObservationBody {
        consciousness: args.consciousness.clone(),
        oxygen: args.oxygen.clone(),
        spo2_scale: args.spo2_scale,
    }
    .into_record(adm.patient.clone(), &args.by, now_ns())
    .map_err(|e| anyhow::anyhow!(e))?;
    observations::append(dir, &record)?;
    println!(
        "observation recorded for patient {} ({} bed {})",
        adm.patient, adm.unit, adm.bed
    );
    Ok(())
}

#[derive(Serialize)]
struct AlertRow<'a> {
    #[serde(flatten)]
    alert: &'a Alert,
}

pub fn alerts(dir: &Path, cmd: &AlertsCommand) -> anyhow::Result<()> {
    let AlertsCommand::List {
        patient,
        unit,
        active,
        history,
        limit,
        format,
    } = cmd;
    let records = crate::alerting::read_log(dir)?;
    let mut list: Vec<Alert> = if *history {
        records
    } else {
        crate::alerting::latest(records).into_values().collect()
    };
    list.retain(|a| {
        patient
            .as_ref()
            .is_none_or(|p| a.patient.as_ref() == Some(p))
            && unit.as_ref().is_none_or(|u| a.unit.as_ref() == Some(u))
            && (!*active || a.state.is_open())
    });
    list.sort_by_key(|a| std::cmp::Reverse((a.at_ns, a.seq)));
    let total = list.len();
    list.truncate(*limit);
    let rows: Vec<AlertRow> = list.iter().map(|alert| AlertRow { alert }).collect();
    let text = Rows {
        header: vec![
            "alert",
            "state",
            "event",
            "priority",
            "tier",
            "patient",
            "unit",
            "bed",
            "rule",
            "first reading",
            "at",
            "by",
        ],
        rows: list
            .iter()
            .map(|a| {
                vec![
                    a.id.clone(),
                    a.state.name().into(),
                    format!("{:?}", a.event).to_lowercase(),
                    format!("{:?}", a.priority).to_lowercase(),
                    a.tier.to_string(),
                    a.patient
                        .clone()
                        .or_else(|| a.device.clone())
                        .unwrap_or_default(),
                    a.unit.clone().unwrap_or_default(),
                    a.bed.clone().unwrap_or_default(),
                    a.rule.clone(),
                    format_time(a.first_reading_ns),
                    format_time(a.at_ns),
                    a.by.clone().unwrap_or_default(),
                ]
            })
            .collect(),
    };
    crate::cli::print_rows(*format, &text, &rows)?;
    if total > list.len() {
        eprintln!(
            "({} of {total} alerts shown; --limit shows more)",
            list.len()
        );
    }
    Ok(())
}

pub fn rules(cmd: &RulesCommand) -> anyhow::Result<()> {
    match cmd {
        RulesCommand::Check { files } => {
            let mut failed = 0;
            let mut all = RuleSet::default();
            for f in files {
                match RuleSet::load_files(std::slice::from_ref(f)).and_then(|s| {
                    let n = s.rules.len();
                    all.extend(s).map(|()| n)
                }) {
                    Ok(n) => println!("{}: {n} rules ok", f.display()),
                    Err(e) => {
                        failed += 1;
                        eprintln!("{e}");
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} of {} rule files refused", files.len());
            }
            Ok(())
        }
        RulesCommand::Default => {
            print!("{}", wardflow_rules::DEFAULT_RULES);
            Ok(())
        }
    }
}
