//! Configuration: one typed struct with its defaults in one place, read
//! from TOML (`--config FILE`) and overridden key by key by flags.
//!
//! `wardflow config` prints the effective configuration; every key below is
//! also a flag of `wardflow serve` (see `wardflow serve --help`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use wardflow_ingest::priority::AlertPathScheduling;
use wardflow_ingest::server::MqttLimits;
use wardflow_ingest::validate::ValidationConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where registry, write-ahead log, store and checkpoints live.
    pub data_dir: PathBuf,
    pub mqtt: MqttSection,
    pub http: HttpSection,
    pub dataflow: DataflowSection,
    pub storage: StorageSection,
    pub validation: ValidationSection,
    pub limits: LimitsSection,
    pub wal: WalSection,
    pub rules: RulesSection,
    pub ledger: LedgerSection,
    pub research: ResearchSection,
    pub scheduling: SchedulingSection,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulingSection {
    /// How the threads on a publish's way to its alert (MQTT workers, the
    /// log writer, the dataflow workers, the alert thread) are scheduled:
    /// `realtime` (SCHED_FIFO at priority 1, ahead of storage and ledger
    /// work; needs CAP_SYS_NICE or RLIMIT_RTPRIO, else a short slice),
    /// `short-slice` (the normal class with a 0.1 ms slice) or `normal`
    /// (docs/storage.md, "Scheduling").
    pub alert_path: AlertPathScheduling,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResearchSection {
    /// Address of the Arrow Flight server researchers read studies from
    /// (process 0); empty: no Flight server, studies still release to
    /// their logs.
    pub flight: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LedgerSection {
    /// Keep the audit trail: every stored row becomes a leaf of a Merkle
    /// batch, sealed and anchored every anchor interval (docs/ledger.md).
    /// Turning it off leaves stored data unprovable; it exists to measure
    /// what the trail costs.
    pub enabled: bool,
    /// Length of a batch, ms of dataflow time (the `--anchor-interval`).
    pub anchor_interval_ms: u64,
    /// The node's signing key; default `ledger/node.pk8` in the data
    /// directory, created on first start.
    pub key_file: Option<PathBuf>,
    /// A Substrate chain's WebSocket RPC endpoint (`ws://host:9944`):
    /// batch hashes are anchored there with `system.remark_with_event`.
    /// Without it the ledger runs in local mode (docs/ledger.md).
    pub url: Option<String>,
    /// The node's chain account: a file holding its secret URI; default
    /// `ledger/chain.suri`, a new random key created on first start. The
    /// environment variable WARDFLOW_LEDGER_SURI (e.g. `//Alice` on a
    /// development chain) takes precedence. The account pays the fees.
    pub account_file: Option<PathBuf>,
    /// How long one anchoring extrinsic may take to be finalized, s.
    pub finality_timeout_s: u64,
    /// With a chain: the block from which consent records are read on the
    /// first start (later starts resume where they stopped). On a public
    /// chain, set it to the block at which the deployment began.
    pub consent_from_block: u64,
}

impl Default for LedgerSection {
    fn default() -> Self {
        Self {
            enabled: true,
            anchor_interval_ms: 1000,
            key_file: None,
            url: None,
            account_file: None,
            finality_timeout_s: 60,
            consent_from_block: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RulesSection {
    /// Directory of alert rule files (*.toml), reloaded when they change.
    /// Without it, the built-in adult ICU rule set runs.
    pub dir: Option<PathBuf>,
    /// How often the rule files are checked for changes, ms.
    pub reload_ms: u64,
}

impl Default for RulesSection {
    fn default() -> Self {
        Self {
            dir: None,
            reload_ms: 1000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSection {
    /// Address of the MQTT listener (MQTT 3.1.1 and 5.0, plain TCP).
    pub listen: String,
    /// Threads serving MQTT connections.
    pub io_threads: usize,
    /// Largest accepted MQTT packet, bytes.
    pub max_packet_bytes: u32,
    /// Publishes in flight per connection (v5 Receive Maximum).
    pub max_inflight: u16,
    /// Payload bytes in flight per connection.
    pub max_inflight_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    /// Address of the HTTP listener (/healthz, /metrics, the alert API and
    /// the web console).
    pub listen: String,
    /// The built web console to serve (docs/console.md); default the
    /// `console/dist` of the source tree the binary was built from. The
    /// environment variable WARDFLOW_CONSOLE_DIR takes precedence.
    pub console_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataflowSection {
    /// Timely workers per process; 0 means one per CPU core.
    pub workers: usize,
    /// Processes in the timely cluster.
    pub processes: usize,
    /// This process's index, 0..processes.
    pub process: usize,
    /// File with one `host:port` per process, for timely's cluster mode.
    /// Without it, processes listen on 127.0.0.1:2101, 2102, ...
    pub hostfile: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSection {
    /// Length of a storage flush interval, ms: readings become queryable
    /// and the checkpoint advances in these steps.
    pub flush_interval_ms: u64,
    /// Compact a partition once it holds this many small files.
    pub compaction_min_files: usize,
    /// Most rows in one compacted file.
    pub compaction_max_rows: usize,
    /// An interval whose files hold this many rows is not compacted.
    pub compaction_large_rows: usize,
    /// Seal stored values under per-patient data keys wrapped by this
    /// master key: `file:PATH`, `env:VARIABLE` or `command:COMMAND` (64
    /// hexadecimal digits; never inside the data directory). Unset: values
    /// are stored in the clear.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master_key: Option<String>,
    /// How long each table is kept; expired hour partitions are dropped.
    pub retention: RetentionSection,
    /// Where readings, dead letters and alert transitions go: `embedded`
    /// (Parquet in the data directory), `questdb` (the `[storage.questdb]`
    /// receiver), or `both` (embedded for the hot window, QuestDB for
    /// history). docs/questdb.md.
    pub backend: Backend,
    pub questdb: QuestDbSection,
}

/// Per-table retention: a duration such as `"30d"`, `"12h"`, `"90m"`, or
/// empty to keep the table forever.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionSection {
    pub readings: String,
    pub deadletters: String,
}

/// Parses a retention period: a whole number and `s`, `m`, `h` or `d`, at
/// most 100 years.
pub fn parse_period(s: &str) -> Result<Option<i64>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let bad = || {
        format!(
            "{s:?}: give a positive whole number and s, m, h or d (e.g. \"30d\"), at most 100 years"
        )
    };
    let (n, unit) = s.split_at(s.char_indices().last().map_or(0, |(i, _)| i));
    let scale: i64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    const MAX_S: i64 = 100 * 366 * 86_400;
    match n.parse::<i64>() {
        Ok(n) if n > 0 => n
            .checked_mul(scale)
            .filter(|&secs| secs <= MAX_S)
            .map(|secs| Some(secs * 1_000_000_000))
            .ok_or_else(bad),
        _ => Err(bad()),
    }
}

/// Which time-series sinks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Embedded,
    Questdb,
    Both,
}

impl Backend {
    pub fn embedded(self) -> bool {
        self != Backend::Questdb
    }

    pub fn questdb(self) -> bool {
        self != Backend::Embedded
    }
}

/// The QuestDB sink (docs/questdb.md).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuestDbSection {
    /// The questdb-rs configuration string: `http::addr=HOST:9000;` (ILP
    /// over HTTP, the default), `https::...`, `tcp::addr=HOST:9009;` or
    /// `tcps::...`, with `username`, `password`, `token` and TLS keys as
    /// questdb-rs takes them. For a receiver of the plain InfluxDB line
    /// protocol add `protocol_version=1;`. The environment variable
    /// WARDFLOW_QUESTDB_CONF takes precedence (keep credentials there).
    /// Never logged.
    pub conf: String,
    /// Where batches wait while the receiver is down; default
    /// DATA_DIR/spool/questdb.
    pub spool_dir: Option<PathBuf>,
    /// Most the spool may hold, MiB; beyond it, rows stay in the
    /// write-ahead log until the receiver is back.
    pub spool_max_mb: u64,
    /// Most rows in one request.
    pub batch_rows: usize,
    /// How long alert transitions may wait for a fuller request, ms.
    pub max_batch_age_ms: u64,
    /// How long a flush waits for the receiver before its rows go to the
    /// spool, ms.
    pub spool_after_ms: u64,
}

impl std::fmt::Debug for QuestDbSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuestDbSection")
            .field("conf", &wardflow_storage::questdb::redact(&self.conf))
            .field("spool_dir", &self.spool_dir)
            .field("spool_max_mb", &self.spool_max_mb)
            .field("batch_rows", &self.batch_rows)
            .field("max_batch_age_ms", &self.max_batch_age_ms)
            .field("spool_after_ms", &self.spool_after_ms)
            .finish()
    }
}

impl Default for QuestDbSection {
    fn default() -> Self {
        Self {
            conf: String::new(),
            spool_dir: None,
            spool_max_mb: 1024,
            batch_rows: 50_000,
            max_batch_age_ms: 1000,
            spool_after_ms: 2000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValidationSection {
    /// How far a device clock may run ahead of the server, ms.
    pub max_future_skew_ms: u64,
    /// Oldest accepted reading on receipt, ms.
    pub max_age_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Memory the server may use, MiB. A quarter of it is the budget for
    /// readings between a device's socket and storage (payload, decoded
    /// readings, rows awaiting their flush); when that is spent, devices are
    /// slowed by TCP backpressure. The rest covers flushing (encoding Parquet),
    /// connections and the program itself.
    pub memory_mb: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WalSection {
    /// Size at which a new write-ahead-log segment starts, MiB.
    pub segment_mb: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./wardflow-data"),
            mqtt: MqttSection::default(),
            http: HttpSection::default(),
            dataflow: DataflowSection::default(),
            storage: StorageSection::default(),
            validation: ValidationSection::default(),
            limits: LimitsSection::default(),
            wal: WalSection::default(),
            rules: RulesSection::default(),
            ledger: LedgerSection::default(),
            research: ResearchSection::default(),
            scheduling: SchedulingSection::default(),
        }
    }
}

impl Default for MqttSection {
    fn default() -> Self {
        let l = MqttLimits::default();
        Self {
            listen: "127.0.0.1:1883".into(),
            io_threads: 1,
            max_packet_bytes: l.max_packet_bytes,
            max_inflight: l.max_inflight,
            max_inflight_bytes: l.max_inflight_bytes,
        }
    }
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            console_dir: None,
        }
    }
}

impl Default for DataflowSection {
    fn default() -> Self {
        Self {
            workers: 0,
            processes: 1,
            process: 0,
            hostfile: None,
        }
    }
}

impl Default for StorageSection {
    fn default() -> Self {
        Self {
            flush_interval_ms: 1000,
            compaction_min_files: 16,
            compaction_max_rows: 1 << 20,
            compaction_large_rows: 1 << 18,
            master_key: None,
            retention: RetentionSection::default(),
            backend: Backend::default(),
            questdb: QuestDbSection::default(),
        }
    }
}

impl Default for ValidationSection {
    fn default() -> Self {
        let v = ValidationConfig::default();
        Self {
            max_future_skew_ms: v.max_future_skew_ms,
            max_age_ms: v.max_age_ms,
        }
    }
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self { memory_mb: 1024 }
    }
}

impl Default for WalSection {
    fn default() -> Self {
        Self { segment_mb: 64 }
    }
}

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Reads a TOML file; missing keys take their defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map_or((1, 1), |span| line_column(text, span.start));
            ConfigError::Parse {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().to_string(),
            }
        })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.storage.flush_interval_ms == 0 {
            return bad("storage.flush_interval_ms must be at least 1".into());
        }
        for (key, v) in [
            (
                "storage.retention.readings",
                &self.storage.retention.readings,
            ),
            (
                "storage.retention.deadletters",
                &self.storage.retention.deadletters,
            ),
        ] {
            if let Err(e) = parse_period(v) {
                return bad(format!("{key}: {e}"));
            }
        }
        if let Some(k) = &self.storage.master_key
            && let Err(e) = k.parse::<wardflow_storage::seal::MasterKeySource>()
        {
            return bad(format!("storage.master_key: {e}"));
        }
        if self.dataflow.processes == 0 || self.dataflow.process >= self.dataflow.processes {
            return bad(format!(
                "dataflow.process is {} but must be below dataflow.processes ({})",
                self.dataflow.process, self.dataflow.processes
            ));
        }
        if self.limits.memory_mb < 16 {
            return bad("limits.memory_mb must be at least 16".into());
        }
        if self.ledger.anchor_interval_ms == 0 {
            return bad("ledger.anchor_interval_ms must be at least 1".into());
        }
        if self.mqtt.io_threads == 0 {
            return bad("mqtt.io_threads must be at least 1".into());
        }
        if self.mqtt.max_inflight == 0 {
            return bad("mqtt.max_inflight must be at least 1".into());
        }
        self.validate_questdb()
    }

    /// The QuestDB sink's settings, checked when it runs.
    fn validate_questdb(&self) -> Result<(), ConfigError> {
        if !self.storage.backend.questdb() {
            return Ok(());
        }
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let q = &self.storage.questdb;
        let conf = self.questdb_conf();
        if conf.trim().is_empty() {
            let backend = format!("{:?}", self.storage.backend).to_lowercase();
            return bad(format!(
                "storage.backend is {backend} but storage.questdb.conf is empty (e.g. \"http::addr=127.0.0.1:9000;\", or WARDFLOW_QUESTDB_CONF)"
            ));
        }
        if let Err(e) = wardflow_storage::questdb::check_conf(&conf) {
            return bad(e.to_string());
        }
        if q.batch_rows == 0 {
            return bad("storage.questdb.batch_rows must be at least 1".into());
        }
        if q.spool_max_mb == 0 {
            return bad("storage.questdb.spool_max_mb must be at least 1".into());
        }
        if q.spool_after_ms == 0 {
            return bad("storage.questdb.spool_after_ms must be at least 1".into());
        }
        Ok(())
    }

    /// The QuestDB connection string: WARDFLOW_QUESTDB_CONF, or the file's.
    pub fn questdb_conf(&self) -> String {
        match std::env::var("WARDFLOW_QUESTDB_CONF") {
            Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
            _ => self.storage.questdb.conf.clone(),
        }
    }

    /// The QuestDB sink's settings, when it runs.
    pub fn questdb_sink(&self) -> Option<wardflow_storage::questdb::SinkConfig> {
        if !self.storage.backend.questdb() {
            return None;
        }
        let q = &self.storage.questdb;
        let spool = q
            .spool_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("spool").join("questdb"));
        let mut c = wardflow_storage::questdb::SinkConfig::new(self.questdb_conf(), spool);
        c.spool_max_bytes = q.spool_max_mb.saturating_mul(1 << 20);
        c.batch_rows = q.batch_rows;
        c.max_batch_age = std::time::Duration::from_millis(q.max_batch_age_ms);
        c.spool_after = std::time::Duration::from_millis(q.spool_after_ms);
        Some(c)
    }

    /// The configuration as `wardflow config` prints it: secrets of the
    /// QuestDB connection string masked.
    pub fn to_toml_redacted(&self) -> String {
        let mut c = self.clone();
        if !c.storage.questdb.conf.is_empty() {
            c.storage.questdb.conf = wardflow_storage::questdb::redact(&c.storage.questdb.conf);
        }
        c.to_toml()
    }

    /// Where the ledger keeps its anchor logs and leaf indexes.
    /// How long each table of the embedded store is kept.
    pub fn retention(&self) -> wardflow_storage::retention::Retention {
        let r = &self.storage.retention;
        wardflow_storage::retention::Retention {
            readings_ns: parse_period(&r.readings).ok().flatten(),
            dead_letters_ns: parse_period(&r.deadletters).ok().flatten(),
        }
    }

    /// The keyring of the data directory, when a master key is configured.
    /// A store that has a keyring is refused without its master key: new
    /// values would otherwise be written in the clear.
    pub fn keyring(
        &self,
    ) -> anyhow::Result<Option<std::sync::Arc<wardflow_storage::seal::Keyring>>> {
        use wardflow_storage::seal::{KEYS_DIR, Keyring, MasterKey, MasterKeySource};
        let Some(source) = &self.storage.master_key else {
            if self.data_dir.join(KEYS_DIR).join("keyring.json").exists() {
                anyhow::bail!(
                    "{} is encrypted at rest: give its master key (--master-key or storage.master_key)",
                    self.data_dir.display()
                );
            }
            return Ok(None);
        };
        let source: MasterKeySource = source.parse().map_err(anyhow::Error::msg)?;
        std::fs::create_dir_all(&self.data_dir)?;
        let master = MasterKey::load(&source, &self.data_dir)?;
        Ok(Some(std::sync::Arc::new(Keyring::open(
            &self.data_dir,
            master,
        )?)))
    }

    /// The keyring for a command that only reads: as [`Config::keyring`],
    /// but a store without a keyring stays without one (it is read in the
    /// clear, master key or not).
    pub fn keyring_to_read(
        &self,
    ) -> anyhow::Result<Option<std::sync::Arc<wardflow_storage::seal::Keyring>>> {
        use wardflow_storage::seal::{KEYS_DIR, Keyring, MasterKey, MasterKeySource};
        match &self.storage.master_key {
            Some(source) if self.data_dir.join(KEYS_DIR).join("keyring.json").exists() => {
                let source: MasterKeySource = source.parse().map_err(anyhow::Error::msg)?;
                let master = MasterKey::load(&source, &self.data_dir)?;
                Ok(Keyring::open_existing(&self.data_dir, master)?.map(std::sync::Arc::new))
            }
            Some(_) => Ok(None),
            None => self.keyring(),
        }
    }

    /// Where the built web console is: WARDFLOW_CONSOLE_DIR, the
    /// setting, or the source tree's `console/dist`.
    pub fn console_dir(&self) -> PathBuf {
        std::env::var_os("WARDFLOW_CONSOLE_DIR")
            .map(PathBuf::from)
            .or_else(|| self.http.console_dir.clone())
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../console/dist"))
    }

    pub fn ledger_dir(&self) -> PathBuf {
        self.data_dir.join("ledger")
    }

    /// The node's signing key file.
    pub fn ledger_key_file(&self) -> PathBuf {
        self.ledger
            .key_file
            .clone()
            .unwrap_or_else(|| self.ledger_dir().join("node.pk8"))
    }

    /// The node's chain account secret URI: WARDFLOW_LEDGER_SURI, or the
    /// account file (created if missing).
    pub fn ledger_suri(&self) -> anyhow::Result<String> {
        if let Ok(s) = std::env::var("WARDFLOW_LEDGER_SURI")
            && !s.trim().is_empty()
        {
            return Ok(s.trim().to_string());
        }
        let path = self
            .ledger
            .account_file
            .clone()
            .unwrap_or_else(|| self.ledger_dir().join("chain.suri"));
        Ok(wardflow_ledger_bridge::chain::load_or_create_suri(&path)?)
    }

    /// Timely workers in this process.
    pub fn workers(&self) -> usize {
        match self.dataflow.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// Memory for readings in flight (a quarter of the memory limit).
    pub fn in_flight_budget(&self) -> u64 {
        self.limits.memory_mb * (1 << 20) / 4
    }

    pub fn mqtt_limits(&self) -> MqttLimits {
        MqttLimits {
            max_packet_bytes: self.mqtt.max_packet_bytes,
            max_inflight: self.mqtt.max_inflight,
            max_inflight_bytes: self.mqtt.max_inflight_bytes,
            ..MqttLimits::default()
        }
    }

    pub fn validation_config(&self) -> ValidationConfig {
        ValidationConfig {
            max_future_skew_ms: self.validation.max_future_skew_ms,
            max_age_ms: self.validation.max_age_ms,
        }
    }
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_periods_parse_and_bounds_are_kept() {
        assert_eq!(parse_period(""), Ok(None));
        assert_eq!(parse_period("30d"), Ok(Some(30 * 86_400 * 1_000_000_000)));
        assert_eq!(parse_period(" 90m "), Ok(Some(90 * 60 * 1_000_000_000)));
        for bad in [
            "0d",
            "-1d",
            "d",
            "30",
            "30w",
            "5µ",
            "1000000d",
            "99999999999999999h",
        ] {
            assert!(parse_period(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let c = Config::default();
        let back = Config::parse(&c.to_toml(), Path::new("x.toml")).unwrap();
        assert_eq!(c, back);
        c.validate().unwrap();
    }

    #[test]
    fn partial_files_keep_defaults() {
        let c = Config::parse("[mqtt]\nlisten = \"0.0.0.0:1884\"\n", Path::new("w.toml")).unwrap();
        assert_eq!(c.mqtt.listen, "0.0.0.0:1884");
        assert_eq!(c.http, HttpSection::default());
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let text = "data_dir = \"d\"\n\n[storage]\nflush_interval_ms = \"soon\"\n";
        let err = Config::parse(text, Path::new("wardflow.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("wardflow.toml:4:"), "{err}");
        assert!(err.contains("invalid type"), "{err}");
        let err = Config::parse("[mqtt]\nlisten = \"x\"\nport = 1\n", Path::new("w.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("w.toml:3:") && err.contains("unknown field `port`"),
            "{err}"
        );
    }

    #[test]
    fn the_questdb_sink_is_configured_and_checked() {
        let text = "[storage]\nbackend = \"both\"\n[storage.questdb]\nconf = \"http::addr=db:9000;username=u;password=pw;\"\nbatch_rows = 10\n";
        let c = Config::parse(text, Path::new("w.toml")).unwrap();
        assert_eq!(c.storage.backend, Backend::Both);
        c.validate().unwrap();
        let sink = c.questdb_sink().unwrap();
        assert_eq!(sink.batch_rows, 10);
        assert_eq!(sink.spool_dir, c.data_dir.join("spool").join("questdb"));
        assert!(!format!("{c:?}").contains("pw"));
        assert!(!c.to_toml_redacted().contains("pw"));

        let mut c = Config::default();
        c.storage.backend = Backend::Questdb;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("storage.questdb.conf is empty"), "{err}");
        c.storage.questdb.conf = "ws::addr=db:9000;".into();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.starts_with("storage.questdb.conf:"), "{err}");
        assert!(Config::default().questdb_sink().is_none());
    }

    #[test]
    fn impossible_values_are_refused() {
        let mut c = Config::default();
        c.dataflow.process = 1;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("dataflow.process")
        );
    }
}
