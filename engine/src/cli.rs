//! The `wardflow` command line.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use wardflow_ingest::registry::Registry;
use wardflow_model::{DeviceId, Metric, PatientId};
use wardflow_simulator::scenario::Scenario;
use wardflow_simulator::{Credential, PayloadKind, SimConfig};
use wardflow_storage::query::{DeadLetterQuery, ReadingQuery, read_dead_letters, read_readings};

use crate::config::Config;
use crate::node::Node;
use crate::output::{Format, Rows, format_time, parse_duration, parse_time};

/// Wardflow at info; the network libraries only when something is wrong
/// (ntex-mqtt's client warns on every closed connection).
pub const DEFAULT_LOG: &str = "info,ntex=warn,ntex_server=warn,ntex_rt=warn,ntex_service=warn,ntex_io=warn,ntex_mqtt=warn,ntex_mqtt::control=error";

#[derive(Parser, Debug)]
#[command(
    name = "wardflow",
    version,
    about = "Patient-controlled telemetry and alert engine for hospitals",
    long_about = "Wardflow ingests vital signs from bedside devices over MQTT, validates them in a timely \
                  dataflow, and stores them durably. Start with `wardflow demo`."
)]
pub struct Cli {
    /// Data directory: device registry, write-ahead log, store [default: ./wardflow-data]
    #[arg(long, global = true, env = "WARDFLOW_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// TOML configuration file (see `wardflow config` for every key)
    #[arg(long, global = true, env = "WARDFLOW_CONFIG")]
    pub config: Option<PathBuf>,
    /// Master key of the encryption at rest: file:PATH, env:VARIABLE or command:COMMAND [storage.master_key]
    #[arg(
        long,
        global = true,
        env = "WARDFLOW_MASTER_KEY_SOURCE",
        value_name = "SOURCE"
    )]
    pub master_key: Option<String>,
    /// Log filter (tracing EnvFilter syntax), e.g. `info`, `warn`, `wardflow_ingest=debug`
    #[arg(long, global = true, env = "WARDFLOW_LOG", default_value = DEFAULT_LOG)]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the engine: MQTT ingest, dataflow, storage, HTTP health and metrics
    Serve(ServeArgs),
    /// Run the engine with 50 simulated patients on loopback and a temporary data directory
    Demo(DemoArgs),
    /// Register, list and remove devices
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// Publish simulated vital signs to an MQTT server and report throughput and latency
    Simulate(SimulateArgs),
    /// Print stored readings
    Query(QueryArgs),
    /// Inspect rejected readings
    #[command(subcommand)]
    Deadletters(DeadlettersCommand),
    /// Print the effective configuration as TOML (defaults, file, then flags)
    Config(ServeArgs),
    /// Admit, transfer, discharge and list patients
    #[command(subcommand)]
    Patients(crate::clinical_cli::PatientsCommand),
    /// Clinician accounts for the alert feeds
    #[command(subcommand)]
    Clinicians(crate::clinical_cli::CliniciansCommand),
    /// Administrator accounts of the web console
    #[command(subcommand)]
    Admins(crate::clinical_cli::AdminsCommand),
    /// Record a manual observation (consciousness, oxygen, SpO2 scale) for NEWS2
    Observe(crate::clinical_cli::ObserveArgs),
    /// The alert log
    #[command(subcommand)]
    Alerts(crate::clinical_cli::AlertsCommand),
    /// Check alert rule files
    #[command(subcommand)]
    Rules(crate::clinical_cli::RulesCommand),
    /// Check stored data against the anchored audit batches
    Verify(crate::verify::VerifyArgs),
    /// Every access to a patient's data, with its proof status
    Audit(crate::verify::AuditArgs),
    /// A patient's readings, alerts and access log as a FHIR R4 Bundle, CSV or Parquet
    Export(crate::export::ExportArgs),
    /// Patients' consent on the chain: sign and submit grants, delegations, revocations; list them
    #[command(subcommand)]
    Consent(crate::consent::ConsentCommand),
    /// Break-glass: time-limited access to a patient's data without consent, and its review
    #[command(subcommand)]
    Emergency(crate::emergency::EmergencyCommand),
    /// Research studies: register, list, show, close, and their usage
    #[command(subcommand)]
    Studies(crate::studies::StudiesCommand),
    /// Researcher accounts for the Arrow Flight server
    #[command(subcommand)]
    Researchers(crate::studies::ResearchersCommand),
    /// Score NEWS2 (RCP 2017) for JSON Lines observation sets on stdin
    News2,
    /// Encryption at rest: make a master key, rotate it, show the keyring
    #[command(subcommand)]
    Keys(crate::keys::KeysCommand),
}

/// Flags that override the configuration file, key by key.
#[derive(Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// MQTT listen address [mqtt.listen, default 127.0.0.1:1883]
    #[arg(long, value_name = "ADDR")]
    pub mqtt: Option<String>,
    /// Threads serving MQTT connections [mqtt.io_threads, default 1]
    #[arg(long, value_name = "N")]
    pub mqtt_io_threads: Option<usize>,
    /// Largest accepted MQTT packet in bytes [mqtt.max_packet_bytes, default 1048576]
    #[arg(long, value_name = "BYTES")]
    pub mqtt_max_packet_bytes: Option<u32>,
    /// Publishes in flight per connection [mqtt.max_inflight, default 64]
    #[arg(long, value_name = "N")]
    pub mqtt_max_inflight: Option<u16>,
    /// Payload bytes in flight per connection [mqtt.max_inflight_bytes, default 4194304]
    #[arg(long, value_name = "BYTES")]
    pub mqtt_max_inflight_bytes: Option<usize>,
    /// HTTP listen address for /healthz and /metrics [http.listen, default 127.0.0.1:8080]
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
    /// The built web console to serve [http.console_dir, default the source tree's console/dist]
    #[arg(long, value_name = "DIR")]
    pub console_dir: Option<PathBuf>,
    /// Timely workers per process, 0 = one per core [dataflow.workers, default 0]
    #[arg(long, short = 'w', value_name = "W")]
    pub workers: Option<usize>,
    /// Processes in the timely cluster [dataflow.processes, default 1]
    #[arg(long, short = 'n', value_name = "N")]
    pub processes: Option<usize>,
    /// This process's index in the cluster [dataflow.process, default 0]
    #[arg(long, short = 'p', value_name = "I")]
    pub process: Option<usize>,
    /// One host:port per process [dataflow.hostfile; default 127.0.0.1:2101, 2102, ...]
    #[arg(long, value_name = "FILE")]
    pub hostfile: Option<PathBuf>,
    /// Storage flush interval in ms [storage.flush_interval_ms, default 1000]
    #[arg(long, value_name = "MS")]
    pub flush_interval_ms: Option<u64>,
    /// Compact a partition at this many small files [storage.compaction_min_files, default 16]
    #[arg(long, value_name = "N")]
    pub compaction_min_files: Option<usize>,
    /// Most rows per compacted file [storage.compaction_max_rows, default 1048576]
    #[arg(long, value_name = "ROWS")]
    pub compaction_max_rows: Option<usize>,
    /// Leave intervals of at least this many rows uncompacted [storage.compaction_large_rows, default 262144]
    #[arg(long, value_name = "ROWS")]
    pub compaction_large_rows: Option<usize>,
    /// Where readings go: embedded, questdb or both [storage.backend, default embedded]
    #[arg(long, value_name = "BACKEND")]
    pub storage_backend: Option<crate::config::Backend>,
    /// questdb-rs configuration string, e.g. http::addr=HOST:9000; (prefer WARDFLOW_QUESTDB_CONF for credentials) [storage.questdb.conf]
    #[arg(long, value_name = "CONF")]
    pub questdb: Option<String>,
    /// Where QuestDB batches wait while the receiver is down [storage.questdb.spool_dir, default DATA_DIR/spool/questdb]
    #[arg(long, value_name = "DIR")]
    pub questdb_spool_dir: Option<PathBuf>,
    /// Most the QuestDB spool holds, MiB [storage.questdb.spool_max_mb, default 1024]
    #[arg(long, value_name = "MIB")]
    pub questdb_spool_max_mb: Option<u64>,
    /// Most rows per QuestDB request [storage.questdb.batch_rows, default 50000]
    #[arg(long, value_name = "ROWS")]
    pub questdb_batch_rows: Option<usize>,
    /// How long alert transitions wait for a fuller QuestDB request, ms [storage.questdb.max_batch_age_ms, default 1000]
    #[arg(long, value_name = "MS")]
    pub questdb_max_batch_age_ms: Option<u64>,
    /// How long a flush waits for QuestDB before its rows go to the spool, ms [storage.questdb.spool_after_ms, default 2000]
    #[arg(long, value_name = "MS")]
    pub questdb_spool_after_ms: Option<u64>,
    /// Drop readings' hour partitions this long after the hour: 30d, 12h, 90m [storage.retention.readings; default: kept forever]
    #[arg(long, value_name = "PERIOD")]
    pub retention_readings: Option<String>,
    /// Drop dead letters' hour partitions this long after the hour [storage.retention.deadletters; default: kept forever]
    #[arg(long, value_name = "PERIOD")]
    pub retention_deadletters: Option<String>,
    /// Allowed device clock skew ahead of the server in ms [validation.max_future_skew_ms, default 30000]
    #[arg(long, value_name = "MS")]
    pub max_future_skew_ms: Option<u64>,
    /// Oldest accepted reading in ms [validation.max_age_ms, default 86400000]
    #[arg(long, value_name = "MS")]
    pub max_age_ms: Option<u64>,
    /// Memory limit for readings in flight and buffered, MiB [limits.memory_mb, default 1024]
    #[arg(long, value_name = "MIB")]
    pub memory_mb: Option<u64>,
    /// Write-ahead-log segment size, MiB [wal.segment_mb, default 64]
    #[arg(long, value_name = "MIB")]
    pub wal_segment_mb: Option<u64>,
    /// Directory of alert rule files, reloaded on change [rules.dir; default: the built-in adult ICU rules]
    #[arg(long, value_name = "DIR")]
    pub rules: Option<PathBuf>,
    /// How often the rule files are checked for changes, ms [rules.reload_ms, default 1000]
    #[arg(long, value_name = "MS")]
    pub rules_reload_ms: Option<u64>,
    /// Keep the audit trail [ledger.enabled, default true]
    #[arg(long, value_name = "BOOL")]
    pub ledger: Option<bool>,
    /// Length of an audit batch, ms [ledger.anchor_interval_ms, default 1000]
    #[arg(long, value_name = "MS")]
    pub anchor_interval: Option<u64>,
    /// The node's signing key [ledger.key_file, default DATA_DIR/ledger/node.pk8]
    #[arg(long, value_name = "FILE")]
    pub ledger_key: Option<PathBuf>,
    /// Anchor batches on this Substrate chain (ws://host:port) [ledger.url; default: local mode]
    #[arg(long, value_name = "URL")]
    pub chain: Option<String>,
    /// File with the node's chain account secret URI [ledger.account_file, default DATA_DIR/ledger/chain.suri; WARDFLOW_LEDGER_SURI wins]
    #[arg(long, value_name = "FILE")]
    pub ledger_account: Option<PathBuf>,
    /// Seconds an anchoring extrinsic may take to be finalized [ledger.finality_timeout_s, default 60]
    #[arg(long, value_name = "S")]
    pub chain_finality_timeout_s: Option<u64>,
    /// First block read for consent records on a first start [ledger.consent_from_block, default 0]
    #[arg(long, value_name = "N")]
    pub consent_from_block: Option<u64>,
    /// Serve research studies over Arrow Flight on this address [research.flight; default: off, demo: 127.0.0.1:8815]
    #[arg(long, value_name = "ADDR")]
    pub flight: Option<String>,
    /// Scheduling of the threads between a publish and its alert: realtime, short-slice or normal [scheduling.alert_path, default realtime]
    #[arg(long, value_name = "MODE")]
    pub alert_path_scheduling: Option<wardflow_ingest::priority::AlertPathScheduling>,
}

impl ServeArgs {
    fn apply(&self, c: &mut Config) {
        macro_rules! set {
            ($flag:expr, $field:expr) => {
                if let Some(v) = $flag.clone() {
                    $field = v;
                }
            };
        }
        set!(self.mqtt, c.mqtt.listen);
        set!(self.mqtt_io_threads, c.mqtt.io_threads);
        set!(self.mqtt_max_packet_bytes, c.mqtt.max_packet_bytes);
        set!(self.mqtt_max_inflight, c.mqtt.max_inflight);
        set!(self.mqtt_max_inflight_bytes, c.mqtt.max_inflight_bytes);
        set!(self.http, c.http.listen);
        if self.console_dir.is_some() {
            c.http.console_dir = self.console_dir.clone();
        }
        set!(self.flight, c.research.flight);
        set!(self.workers, c.dataflow.workers);
        set!(self.processes, c.dataflow.processes);
        set!(self.process, c.dataflow.process);
        if self.hostfile.is_some() {
            c.dataflow.hostfile = self.hostfile.clone();
        }
        set!(self.flush_interval_ms, c.storage.flush_interval_ms);
        set!(self.compaction_min_files, c.storage.compaction_min_files);
        set!(self.compaction_max_rows, c.storage.compaction_max_rows);
        set!(self.compaction_large_rows, c.storage.compaction_large_rows);
        set!(self.storage_backend, c.storage.backend);
        set!(self.questdb, c.storage.questdb.conf);
        if self.questdb_spool_dir.is_some() {
            c.storage.questdb.spool_dir = self.questdb_spool_dir.clone();
        }
        set!(self.questdb_spool_max_mb, c.storage.questdb.spool_max_mb);
        set!(self.questdb_batch_rows, c.storage.questdb.batch_rows);
        set!(
            self.questdb_max_batch_age_ms,
            c.storage.questdb.max_batch_age_ms
        );
        set!(
            self.questdb_spool_after_ms,
            c.storage.questdb.spool_after_ms
        );
        set!(self.retention_readings, c.storage.retention.readings);
        set!(self.retention_deadletters, c.storage.retention.deadletters);
        set!(self.max_future_skew_ms, c.validation.max_future_skew_ms);
        set!(self.max_age_ms, c.validation.max_age_ms);
        set!(self.memory_mb, c.limits.memory_mb);
        set!(self.wal_segment_mb, c.wal.segment_mb);
        if self.rules.is_some() {
            c.rules.dir = self.rules.clone();
        }
        set!(self.rules_reload_ms, c.rules.reload_ms);
        set!(self.ledger, c.ledger.enabled);
        set!(self.anchor_interval, c.ledger.anchor_interval_ms);
        if self.ledger_key.is_some() {
            c.ledger.key_file = self.ledger_key.clone();
        }
        if self.chain.is_some() {
            c.ledger.url = self.chain.clone();
        }
        if self.ledger_account.is_some() {
            c.ledger.account_file = self.ledger_account.clone();
        }
        set!(self.chain_finality_timeout_s, c.ledger.finality_timeout_s);
        set!(self.alert_path_scheduling, c.scheduling.alert_path);
        set!(self.consent_from_block, c.ledger.consent_from_block);
    }
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Simulated patients, one bedside monitor each
    #[arg(long, default_value_t = 50)]
    pub patients: usize,
    /// Readings per second per monitor (7 = each of 7 vitals once a second)
    #[arg(long, default_value_t = 7.0)]
    pub rate: f64,
    /// Stop after this long (e.g. 30s); without it, run until Ctrl-C
    #[arg(long)]
    pub duration: Option<String>,
    /// Share of publishes that are deliberately faulty, to show dead letters at work
    #[arg(long, default_value_t = 0.002)]
    pub bad_ratio: f64,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
pub enum DevicesCommand {
    /// Register a device (bound to a patient, or unbound); prints a generated secret unless --secret is given
    Add {
        device: String,
        #[arg(long)]
        patient: Option<String>,
        /// The device's secret (at least 16 characters); generated when omitted
        #[arg(long)]
        secret: Option<String>,
    },
    /// List registered devices
    List {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Remove a device; a connected device is disconnected at its next publish
    Remove { device: String },
    /// Bind a device to a patient: its next readings are the patient's
    Bind { device: String, patient: String },
    /// Unbind a device from a patient: its readings are stored but raise no patient alert
    Unbind { device: String, patient: String },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PayloadArg {
    Senml,
    Binary,
}

#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// MQTT server, mqtt://HOST:PORT
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    pub target: String,
    /// Number of devices (one virtual patient each)
    #[arg(long, default_value_t = 10)]
    pub devices: usize,
    /// Readings per second per device; 0 = as fast as the server accepts
    #[arg(long, default_value_t = 7.0)]
    pub rate: f64,
    /// How long to publish, e.g. 30s, 5m [default: 10s; with --scenario, the scenario's duration]
    #[arg(long)]
    pub duration: Option<String>,
    /// Play a scripted scenario (TOML; see simulator/scenarios/) in real time: its patients,
    /// devices and events replace --devices, --rate, --prefix and --seed
    #[arg(long, value_name = "FILE", conflicts_with_all = ["devices", "rate", "prefix", "seed"])]
    pub scenario: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = PayloadArg::Senml)]
    pub payload: PayloadArg,
    /// Readings per publish
    #[arg(long, default_value_t = 7)]
    pub batch: usize,
    /// MQTT QoS, 0 or 1
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// QoS 1 publishes in flight per device
    #[arg(long, default_value_t = 32)]
    pub window: u16,
    /// Threads to spread the devices over
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Register the devices in --data-dir first (fresh secrets)
    #[arg(long)]
    pub register: bool,
    /// JSON file of device credentials: written with --register, read without it
    #[arg(long, value_name = "FILE")]
    pub credentials: Option<PathBuf>,
    /// Device id prefix
    #[arg(long, default_value = "sim-")]
    pub prefix: String,
    /// Share of publishes that are deliberately faulty
    #[arg(long, default_value_t = 0.0)]
    pub bad_ratio: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the final report as one JSON object
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct QueryArgs {
    #[arg(long)]
    pub patient: String,
    /// Metric name: hr, spo2, rr, sbp, dbp, map, temp, pr, etco2
    #[arg(long)]
    pub metric: Option<String>,
    #[arg(long)]
    pub device: Option<String>,
    /// From this time (RFC 3339, a date, now, or -15m / -2h / -1d)
    #[arg(long, allow_hyphen_values = true)]
    pub from: Option<String>,
    /// Up to (not including) this time
    #[arg(long, allow_hyphen_values = true)]
    pub to: Option<String>,
    /// Print at most this many readings (the latest ones)
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Who is reading, for the patient's access log [default: cli:$USER]
    #[arg(long = "as", value_name = "ACTOR")]
    pub actor: Option<String>,
    /// Why: treatment, research:<study>, emergency, ...
    #[arg(long, default_value = "treatment")]
    pub purpose: String,
}

#[derive(Subcommand, Debug)]
pub enum DeadlettersCommand {
    /// List dead letters, newest first
    List {
        #[arg(long)]
        device: Option<String>,
        /// Reason code, e.g. implausible_value, malformed_payload
        #[arg(long)]
        reason: Option<String>,
        /// From this receipt time (RFC 3339, a date, now, or -15m / -2h / -1d)
        #[arg(long, allow_hyphen_values = true)]
        from: Option<String>,
        /// Up to (not including) this receipt time
        #[arg(long, allow_hyphen_values = true)]
        to: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

/// Builds the effective configuration: defaults, then the file, then flags.
pub fn effective_config(cli: &Cli, serve: &ServeArgs) -> anyhow::Result<Config> {
    let mut c = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(d) = &cli.data_dir {
        c.data_dir = d.clone();
    }
    if cli.master_key.is_some() {
        c.storage.master_key = cli.master_key.clone();
    }
    serve.apply(&mut c);
    c.validate()?;
    Ok(c)
}

fn data_dir(cli: &Cli) -> anyhow::Result<PathBuf> {
    Ok(effective_config(cli, &ServeArgs::default())?.data_dir)
}

pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log).context("--log")?)
        .with_writer(std::io::stderr)
        // Colour for a terminal only: log files and pipes get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match &cli.command {
        Command::Serve(args) => serve(effective_config(&cli, args)?),
        Command::Demo(args) => crate::demo::run(&cli, args),
        Command::Devices(cmd) => devices(&data_dir(&cli)?, cmd),
        Command::Simulate(args) => simulate(&cli, args),
        Command::Query(args) => query(&effective_config(&cli, &ServeArgs::default())?, args),
        Command::Deadletters(cmd) => {
            deadletters(&effective_config(&cli, &ServeArgs::default())?, cmd)
        }
        Command::Config(args) => {
            print!("{}", effective_config(&cli, args)?.to_toml_redacted());
            Ok(())
        }
        Command::News2 => crate::clinical_cli::news2(),
        Command::Studies(cmd) => crate::studies::studies(&data_dir(&cli)?, cmd),
        Command::Researchers(cmd) => crate::studies::researchers(&data_dir(&cli)?, cmd),
        Command::Patients(crate::clinical_cli::PatientsCommand::Erase {
            patient,
            reason,
            by,
        }) => crate::keys::erase(
            &effective_config(&cli, &ServeArgs::default())?,
            patient,
            reason,
            by.as_deref(),
        ),
        Command::Patients(cmd) => crate::clinical_cli::patients(&data_dir(&cli)?, cmd),
        Command::Keys(cmd) => {
            crate::keys::run(&effective_config(&cli, &ServeArgs::default())?, cmd)
        }
        Command::Clinicians(cmd) => crate::clinical_cli::clinicians(&data_dir(&cli)?, cmd),
        Command::Admins(cmd) => crate::clinical_cli::admins(&data_dir(&cli)?, cmd),
        Command::Observe(args) => crate::clinical_cli::observe(&data_dir(&cli)?, args),
        Command::Alerts(cmd) => crate::clinical_cli::alerts(&data_dir(&cli)?, cmd),
        Command::Rules(cmd) => crate::clinical_cli::rules(cmd),
        Command::Verify(args) => {
            crate::verify::run(&effective_config(&cli, &ServeArgs::default())?, args)
        }
        Command::Audit(args) => {
            crate::verify::audit(&effective_config(&cli, &ServeArgs::default())?, args)
        }
        Command::Export(args) => {
            crate::export::run(&effective_config(&cli, &ServeArgs::default())?, args)
        }
        Command::Consent(cmd) => {
            crate::consent::run(&effective_config(&cli, &ServeArgs::default())?, cmd)
        }
        Command::Emergency(cmd) => {
            crate::emergency::run(&effective_config(&cli, &ServeArgs::default())?, cmd)
        }
    }
}

/// Sets a flag on Ctrl-C or SIGTERM.
pub fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    ctrlc::set_handler(move || s.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    Ok(stop)
}

fn serve(config: Config) -> anyhow::Result<()> {
    let stop = stop_flag()?;
    let node = Node::start(&config)?;
    eprintln!(
        "wardflow: MQTT on {}, HTTP on http://{} (/healthz, /metrics), data in {}; Ctrl-C stops",
        node.mqtt_addr,
        node.http_addr,
        node.data_dir.display()
    );
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("wardflow: stopping; storing everything accepted");
    node.shutdown()
}

fn devices(data_dir: &Path, cmd: &DevicesCommand) -> anyhow::Result<()> {
    match cmd {
        DevicesCommand::Add {
            device,
            patient,
            secret,
        } => {
            let d = DeviceId::new(device).context("device")?;
            let p = patient
                .as_deref()
                .map(PatientId::new)
                .transpose()
                .context("--patient")?;
            if wardflow_ingest::census::Clinicians::load(data_dir)?
                .clinicians
                .contains_key(d.as_str())
            {
                bail!("{d} is a clinician id; device and clinician ids must differ");
            }
            let s = Registry::add(data_dir, d.clone(), p.clone(), secret.as_deref())?;
            match &p {
                Some(p) => println!("device {d} registered for patient {p}"),
                None => println!("device {d} registered, unbound"),
            }
            if secret.is_none() {
                println!("secret: {s}");
                eprintln!("(shown once: only a salted hash is stored)");
            }
        }
        DevicesCommand::List { format } => {
            let reg = Registry::load(data_dir)?;
            #[derive(Serialize)]
            struct Row<'a> {
                device: &'a str,
                patient: &'a str,
                added: String,
            }
            let rows: Vec<Row> = reg
                .devices()
                .map(|d| Row {
                    device: d.id.as_str(),
                    patient: d.patient.as_ref().map_or("", |p| p.as_str()),
                    added: format_time(d.added_ns),
                })
                .collect();
            let text = Rows {
                header: vec!["device", "patient", "added"],
                rows: rows
                    .iter()
                    .map(|r| vec![r.device.into(), r.patient.into(), r.added.clone()])
                    .collect(),
            };
            print_rows(*format, &text, &rows)?;
        }
        DevicesCommand::Remove { device } => {
            let removed = Registry::remove(data_dir, device)?;
            match removed.patient {
                Some(p) => println!("device {} removed (was bound to patient {p})", removed.id),
                None => println!("device {} removed", removed.id),
            }
        }
        DevicesCommand::Bind { device, patient } => {
            let p = PatientId::new(patient).context("patient")?;
            match Registry::bind(data_dir, device, p.clone())? {
                Some(old) if old != p => {
                    println!("device {device} bound to patient {p} (was {old})")
                }
                _ => println!("device {device} bound to patient {p}"),
            }
        }
        DevicesCommand::Unbind { device, patient } => {
            Registry::unbind(data_dir, device, patient)?;
            println!("device {device} unbound from patient {patient}");
        }
    }
    Ok(())
}

pub(crate) fn print_rows<T: Serialize>(
    format: Format,
    rows: &Rows,
    records: &[T],
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Table => rows.write_table(&mut out)?,
        Format::Csv => rows.write_csv(&mut out)?,
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, records)?;
            writeln!(out)?;
        }
    }
    Ok(())
}

/// Says on stderr what a query could not read (an erased patient's rows,
/// rows sealed without the key given).
pub(crate) fn report_withheld(withheld: &[wardflow_storage::query::Withheld]) {
    for w in withheld {
        eprintln!("wardflow: {w}");
    }
}

fn query(config: &Config, args: &QueryArgs) -> anyhow::Result<()> {
    let data_dir = &config.data_dir;
    let keys = config.keyring_to_read()?;
    let metric = match &args.metric {
        Some(m) => Some(Metric::from_name(m).with_context(|| {
            let known: Vec<&str> = Metric::ALL.iter().map(|m| m.name()).collect();
            format!(
                "--metric: unknown metric {m:?}; known metrics are {}",
                known.join(", ")
            )
        })?),
        None => None,
    };
    let q = ReadingQuery {
        patient: Some(args.patient.clone()),
        device: args.device.clone(),
        metric,
        from_ns: args
            .from
            .as_deref()
            .map(|s| parse_time("--from", s))
            .transpose()?,
        to_ns: args
            .to
            .as_deref()
            .map(|s| parse_time("--to", s))
            .transpose()?,
    };
    let answer = read_readings(data_dir, keys.as_deref(), &q)?;
    report_withheld(&answer.withheld);
    let mut rows = answer.rows;
    if let Some(limit) = args.limit {
        let skip = rows.len().saturating_sub(limit);
        rows.drain(..skip);
    }
    // No read of a patient's data without its record in the audit trail.
    let actor = args.actor.clone().unwrap_or_else(|| {
        format!(
            "cli:{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
        )
    });
    let mut detail = vec![format!("{} readings", rows.len())];
    if let Some(m) = &args.metric {
        detail.push(format!("metric={m}"));
    }
    for (k, v) in [
        ("from", &args.from),
        ("to", &args.to),
        ("device", &args.device),
    ] {
        if let Some(v) = v {
            detail.push(format!("{k}={v}"));
        }
    }
    wardflow_ledger_bridge::events::AccessRequest::new(
        wardflow_model::now_ns(),
        &args.patient,
        &actor,
        "query",
        &args.purpose,
        &detail.join(" "),
    )
    .submit(&data_dir.join("ledger"))
    .context("recording the access in the audit trail")?;
    let text = Rows {
        header: vec![
            "time", "patient", "device", "metric", "value", "unit", "seq", "quality",
        ],
        rows: rows
            .iter()
            .map(|r| {
                vec![
                    format_time(r.time_ns),
                    r.patient.clone().unwrap_or_default(),
                    r.device.clone(),
                    r.metric.clone(),
                    r.value.to_string(),
                    r.unit.clone(),
                    r.seq.map(|s| s.to_string()).unwrap_or_default(),
                    r.quality.to_string(),
                ]
            })
            .collect(),
    };
    print_rows(args.format, &text, &rows)
}

fn deadletters(config: &Config, cmd: &DeadlettersCommand) -> anyhow::Result<()> {
    let keys = config.keyring_to_read()?;
    let DeadlettersCommand::List {
        device,
        reason,
        from,
        to,
        limit,
        format,
    } = cmd;
    if let Some(r) = reason
        && wardflow_model::RejectReason::from_code(r).is_none()
    {
        let known: Vec<&str> = wardflow_model::RejectReason::ALL
            .iter()
            .map(|r| r.code())
            .collect();
        bail!(
            "--reason: unknown reason {r:?}; reasons are {}",
            known.join(", ")
        );
    }
    let q = DeadLetterQuery {
        device: device.clone(),
        reason: reason.clone(),
        from_ns: from
            .as_deref()
            .map(|s| parse_time("--from", s))
            .transpose()?,
        to_ns: to.as_deref().map(|s| parse_time("--to", s)).transpose()?,
    };
    let answer = read_dead_letters(&config.data_dir, keys.as_deref(), &q)?;
    report_withheld(&answer.withheld);
    let mut rows = answer.rows;
    let total = rows.len();
    rows.truncate(*limit);
    let text = Rows {
        header: vec![
            "received", "device", "patient", "reason", "metric", "raw", "detail",
        ],
        rows: rows
            .iter()
            .map(|d| {
                vec![
                    format_time(d.received_ns),
                    d.device.clone(),
                    d.patient.clone().unwrap_or_default(),
                    d.reason.clone(),
                    d.metric.clone().unwrap_or_default(),
                    d.raw.clone(),
                    d.detail.clone(),
                ]
            })
            .collect(),
    };
    print_rows(*format, &text, &rows)?;
    if total > rows.len() {
        eprintln!(
            "({} of {total} dead letters shown; --limit shows more)",
            rows.len()
        );
    }
    Ok(())
}

#[derive(Serialize, serde::Deserialize)]
struct CredentialFile {
    device: String,
    patient: String,
    secret: String,
}

fn simulate(cli: &Cli, args: &SimulateArgs) -> anyhow::Result<()> {
    let target = args
        .target
        .strip_prefix("mqtt://")
        .unwrap_or(&args.target)
        .to_string();
    if target.contains("://") {
        bail!("--target: only mqtt:// is supported, got {}", args.target);
    }
    let scenario = args.scenario.as_deref().map(Scenario::load).transpose()?;
    let duration = match (&args.duration, &scenario) {
        (Some(d), _) => parse_duration("--duration", d)?,
        (None, Some(s)) => s.duration,
        (None, None) => Duration::from_secs(10),
    };
    let config = SimConfig {
        target,
        devices: scenario.as_ref().map_or(args.devices, |s| s.patients.len()),
        rate: args.rate,
        duration: Some(duration),
        payload: match args.payload {
            PayloadArg::Senml => PayloadKind::Senml,
            PayloadArg::Binary => PayloadKind::Binary,
        },
        batch: args.batch.max(1),
        qos: args.qos,
        window: args.window,
        threads: args.threads,
        bad_ratio: args.bad_ratio,
        seed: args.seed,
        device_prefix: args.prefix.clone(),
    };
    let creds = if args.register {
        let dir = data_dir(cli)?;
        let creds = match &scenario {
            Some(s) => wardflow_simulator::register_scenario(&dir, s)?,
            None => wardflow_simulator::register(&dir, &config)?,
        };
        if let Some(path) = &args.credentials {
            let file: Vec<CredentialFile> = creds
                .iter()
                .map(|c| CredentialFile {
                    device: c.device.to_string(),
                    patient: c.patient.to_string(),
                    secret: c.secret.clone(),
                })
                .collect();
            std::fs::write(path, serde_json::to_vec_pretty(&file)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        creds
    } else if let Some(path) = &args.credentials {
        let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let file: Vec<CredentialFile> = serde_json::from_slice(&text)
            .with_context(|| format!("{}: not a credentials file", path.display()))?;
        let mut creds = Vec::new();
        let take = if scenario.is_some() {
            usize::MAX
        } else {
            config.devices
        };
        for c in file.into_iter().take(take) {
            creds.push(Credential {
                device: DeviceId::new(&c.device)?,
                patient: PatientId::new(&c.patient)?,
                secret: c.secret,
            });
        }
        if let Some(s) = &scenario {
            let missing = wardflow_simulator::missing_credentials(s, &creds);
            if !missing.is_empty() {
                let ids: Vec<&str> = missing.iter().map(|d| d.as_str()).collect();
                bail!(
                    "{}: no secret for the scenario's devices {}; pass --register",
                    path.display(),
                    ids.join(", ")
                );
            }
        } else if creds.len() < config.devices {
            bail!(
                "{}: holds {} devices, --devices asks for {}",
                path.display(),
                creds.len(),
                config.devices
            );
        }
        creds
    } else {
        bail!(
            "the simulator needs device secrets: pass --register (registers its devices in --data-dir) or --credentials FILE"
        );
    };
    let stop = stop_flag()?;
    let started = Instant::now();
    let report = match &scenario {
        Some(s) => wardflow_simulator::run_scenario(&config, s, creds, stop, |p| eprintln!("{p}")),
        None => wardflow_simulator::run(&config, creds, stop, |p| eprintln!("{p}")),
    };
    if args.json {
        println!("{}", report.to_json());
    } else {
        println!("{report}");
    }
    tracing::debug!("simulation took {:?}", started.elapsed());
    if report.connect_errors as usize == config.devices && config.devices > 0 {
        bail!("no device could connect to {}", config.target);
    }
    Ok(())
}
