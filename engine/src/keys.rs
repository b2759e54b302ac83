//! `wardflow keys` (the master key and the keyring of the encryption at
//! rest) and `wardflow patients erase` (crypto-shredding a patient's data).

use anyhow::{Context as _, bail};
use clap::Subcommand;
use wardflow_ledger_bridge::events::AccessRequest;
use wardflow_storage::seal::{MasterKey, MasterKeySource, rotate};

use crate::config::Config;

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Print a new random master key (64 hexadecimal digits), or write it to a file (mode 0600)
    NewMaster {
        /// Write the key here instead of stdout (outside the data directory)
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
    },
    /// Re-wrap every data key under a new master key; no data is rewritten
    Rotate {
        /// The new master key: file:PATH, env:VARIABLE or command:COMMAND (the current one is --master-key)
        #[arg(long, value_name = "SOURCE")]
        new_master_key: String,
    },
    /// The keyring: how many data keys it holds, and every erasure
    Status,
}

pub fn run(config: &Config, cmd: &KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::NewMaster { out } => {
            let key = MasterKey::generate_hex()?;
            match out {
                None => println!("{key}"),
                Some(path) => {
                    use std::io::Write as _;
                    use std::os::unix::fs::OpenOptionsExt as _;
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(path)
                        .with_context(|| format!("creating {}", path.display()))?;
                    writeln!(f, "{key}")?;
                    f.sync_all()?;
                    eprintln!(
                        "master key written to {} (keep it apart from the data directory; use --master-key file:{})",
                        path.display(),
                        path.display()
                    );
                }
            }
            Ok(())
        }
        KeysCommand::Rotate { new_master_key } => {
            let Some(old) = &config.storage.master_key else {
                bail!("give the current master key with --master-key (or storage.master_key)");
            };
            let old = MasterKey::load(
                &old.parse::<MasterKeySource>().map_err(anyhow::Error::msg)?,
                &config.data_dir,
            )?;
            let new = MasterKey::load(
                &new_master_key
                    .parse::<MasterKeySource>()
                    .map_err(anyhow::Error::msg)?,
                &config.data_dir,
            )
            .context("--new-master-key")?;
            let n = rotate(&config.data_dir, &old, &new)?;
            println!(
                "{n} data keys re-wrapped: master key {} replaces {}; a running engine must be restarted with the new key",
                new.id(),
                old.id()
            );
            Ok(())
        }
        KeysCommand::Status => {
            let keys = config
                .keyring_to_read()?
                .context("the store is not encrypted (no --master-key given)")?;
            println!(
                "master key {}; {} data keys; {} erased",
                keys.master_key_id(),
                keys.len(),
                keys.erasure_count()
            );
            Ok(())
        }
    }
}

/// `wardflow patients erase`: destroys the patient's data key and records
/// the erasure on the audit trail.
pub fn erase(config: &Config, patient: &str, reason: &str, by: Option<&str>) -> anyhow::Result<()> {
    wardflow_model::PatientId::new(patient).context("patient")?;
    let keys = config.keyring_to_read()?.context(
        "the store is not encrypted at rest, so there is no key to destroy: erasure needs --master-key",
    )?;
    let by = by.map(str::to_string).unwrap_or_else(|| {
        format!(
            "cli:{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
        )
    });
    let Some(erasure) = keys.erase(patient, &by, reason)? else {
        let before = keys.erasures(patient);
        match before.last() {
            Some(e) => println!(
                "{patient} has nothing stored since the erasure of {}",
                crate::output::format_time(e.erased_at_ns)
            ),
            None => println!("{patient} has no stored data (no data key)"),
        }
        return Ok(());
    };
    // The erasure is an act on the patient's data: on the audit trail,
    // sealed and anchored like every other.
    AccessRequest::new(
        erasure.erased_at_ns,
        patient,
        &by,
        "erase",
        "erasure",
        &format!(
            "data key generation {} destroyed: {}",
            erasure.generation, reason
        ),
    )
    .submit(&config.ledger_dir())
    .context("recording the erasure in the audit trail")?;
    println!(
        "{patient}: data key generation {} destroyed at {}; the readings and dead letters stored under it can no longer be read by anyone. \
         A running engine starts a new write-ahead log segment and drops the old one once stored (a stopped one on its next start).",
        erasure.generation,
        crate::output::format_time(erasure.erased_at_ns)
    );
    // Files written before encryption at rest was turned on hold values in
    // the clear: no key to destroy reaches them.
    let left = wardflow_storage::query::read_readings(
        &config.data_dir,
        Some(&keys),
        &wardflow_storage::query::ReadingQuery {
            patient: Some(patient.to_string()),
            ..Default::default()
        },
    )?;
    if !left.rows.is_empty() {
        println!(
            "warning: {} readings of {patient} remain readable: they were stored in the clear, before encryption at rest was turned on (or after this erasure began)",
            left.rows.len()
        );
    }
    Ok(())
}
