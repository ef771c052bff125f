//! agentwall's controller: loads the kernel programs, keeps the policy maps current, registers
//! agent cgroups and writes one audit record per decision.

pub mod api;
pub mod btf;
pub mod cgroup;
pub mod controller;
pub mod demo;
pub mod events;
pub mod identity;
pub mod loader;
pub mod pin;
pub mod policy;
pub mod socket_guard;
pub mod sys;
pub mod unix_hooks;
