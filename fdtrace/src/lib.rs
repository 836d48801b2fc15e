//! fdtrace: which call sites hold a process's file descriptors, which keep growing, and what
//! filled the table when a syscall failed with EMFILE.
//!
//! The pipeline (DESIGN.md): [`probe`] → [`decode`] → [`tracer`] (stacks via [`stack`]) →
//! [`model`] → views ([`report`]); [`session`] runs it live.

pub mod cli;
pub mod clock;
pub mod container;
pub mod decode;
pub mod export;
pub mod headroom;
pub mod kept;
pub mod launch;
pub mod layout;
pub mod listeners;
pub mod losses;
pub mod metrics;
pub mod mmap_events;
pub mod model;
pub mod nginx;
pub mod probe;
pub mod procfs;
pub mod python;
pub mod record;
pub mod report;
pub mod select;
pub mod session;
pub mod signals;
pub mod sockdiag;
pub mod stack;
pub mod tracer;
pub mod tui;
