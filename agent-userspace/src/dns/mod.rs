//! The DNS proxy for host-name rules: agents' port-53 traffic is steered here in the kernel; a
//! name the agent's policy allows is forwarded, and its answer's addresses are written into that
//! agent's allow entries before the answer is released.

pub mod proxy;
pub mod upstream;
pub mod wire;
