//! coverd: durable intake of KIE.AI Suno cover callbacks.

pub mod config;
pub mod kie;
