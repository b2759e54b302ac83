//! Research streams: what a study may see of the ward, and nothing more.
//!
//! This crate owns studies (their TOML definition, [`spec`]), the privacy
//! mechanisms and the budget they are charged to ([`privacy`]), cell
//! suppression for k-anonymity ([`suppress`]), the per-window release
//! ([`release`]), the durable release log, budget and usage meter
//! ([`store`]), and the Arrow Flight service researchers read from
//! ([`flight`]). It does not read the write-ahead log, decide consent or
//! run the dataflow: the engine feeds it one summary per patient, window
//! and metric of the patients whose research consent covered the window.

pub mod flight;
pub mod privacy;
pub mod release;
pub mod spec;
pub mod store;
pub mod suppress;
