#![no_std]
// Exists so fdtrace can name this crate as a build-dependency; the probes are in main.rs.
