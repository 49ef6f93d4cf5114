pub mod config;
pub mod fetch;
pub mod guard;
