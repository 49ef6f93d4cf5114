//! The declaration table of every configuration file key.
