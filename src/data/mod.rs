//! The data plane: what every connection runs.

pub mod conn;
pub mod gate;
pub mod held;
pub mod inherited;
pub mod listener;
pub mod relay;
pub mod runtime;
