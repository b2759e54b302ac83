//! The engine: the `wardflow` binary and what ties the stages together.
//!
//! This crate owns the command line ([`cli`]), the configuration ([`config`],
//! TOML with a flag for every key), the timely dataflow that carries logged
//! publishes through validation into storage and advances the checkpoint
//! ([`dataflow`]), the node that starts and stops everything in a safe order
//! ([`node`]), the HTTP endpoints (`/healthz`, `/metrics`, the alert API and
//! the web console's API and files, [`console`]) and the demo. It
//! does not parse payloads, speak MQTT or lay out files: `ingest` and
//! `storage` do, and depend on nothing here.
//!
//! Starting a node from code (as `wardflow serve` does):
//!
//! ```no_run
//! use wardflow_engine::{config::Config, node::Node};
//!
//! let mut config = Config::default();
//! config.data_dir = "./wardflow-data".into();
//! let node = Node::start(&config).unwrap();
//! println!("MQTT on {}", node.mqtt_addr);
//! node.shutdown().unwrap();
//! ```

pub mod alerting;
mod api;
pub mod board;
pub mod cli;
mod clinical_cli;
pub mod config;
pub(crate) mod consent;
pub mod console;
pub mod dataflow;
mod demo;
mod emergency;
mod export;
mod keys;
pub mod ledger;
pub mod metrics;
pub mod node;
pub mod output;
pub mod research;
mod studies;
mod verify;
