//! kiln as a library: its typed [`settings`] and the [`app`] that `kiln work` (and next,
//! `kiln serve`) runs, so tests start exactly what production starts. The `kiln` binary
//! (`main.rs`) parses the command line and calls these.

pub mod app;
pub mod audit;
pub mod client;
pub mod settings;

pub use app::{App, Migrate, WorkOptions};
pub use settings::{Secret, Settings};
