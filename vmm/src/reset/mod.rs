//! VM reuse: putting guest RAM back to a snapshot after a call, by restoring only the pages the
//! call wrote.

pub mod memory;
pub mod session;
pub mod tracker;
pub mod vcpu;
