//! agentwall's controller: loads the kernel programs, keeps the policy maps current, registers
//! agent cgroups and writes one audit record per decision.
//!
//! Folders by role; dependencies run one way: cli -> api -> control -> datapath, and
//! events -> sinks. `daemon` is the composition root that wires them.

pub mod api;
pub mod cli;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod dns;
pub mod events;
pub mod identity;
pub mod policy;
pub mod sinks;
