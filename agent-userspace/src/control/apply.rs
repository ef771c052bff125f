//! Installing a policy set: `prepare` (read, parse, compile: slow, runs off the actor, touches
//! no state) and `State::switch` (the map writes, in the actor).

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result};

use super::{Installed, State};
use crate::{
    datapath::{Datapath, PrefixKeys},
    identity::PolicyMeta,
    policy::{self, CompiledPolicy, PolicySet},
};

/// A policy set compiled and checked, ready to switch to.
pub struct Prepared {
    pub(crate) set: PolicySet,
    pub(crate) compiled: Vec<CompiledPolicy>,
    /// `policy_watch::digest` of `set`.
    pub(crate) digest: u64,
}

/// Reads and compiles the policy directory: blocking, CPU-heavy, run with `spawn_blocking`.
pub fn prepare_dir(dir: &Path) -> Result<Prepared> {
    prepare(policy::load_dir(dir)?)
}

/// Compiles every policy of `set`.
pub fn prepare(set: PolicySet) -> Result<Prepared> {
    let mut compiled = Vec::with_capacity(set.policies.len());
    for p in &set.policies {
        compiled.push(policy::compile(p).with_context(|| format!("policy {}", p.name))?);
    }
    let digest = super::policy_watch::digest(&set);
    Ok(Prepared {
        set,
        compiled,
        digest,
    })
}

impl<D: Datapath> State<D> {
    /// Compiles and installs `set` in the actor (the start, tests).
    pub(crate) fn apply(&mut self, set: PolicySet) -> Result<()> {
        self.switch(prepare(set)?)
    }

    /// Installs a prepared set without a window: watches first (new cgroups below the new
    /// selectors' parents are judged by the fallback from now on), then the new rules under
    /// fresh policy ids, then each entry is switched in one map update, then the old rules
    /// go. If anything fails before the switch, what was added is removed and the running
    /// state stays.
    pub(crate) fn switch(&mut self, prepared: Prepared) -> Result<()> {
        let Prepared {
            set,
            mut compiled,
            digest,
        } = prepared;
        // The agent socket joins each policy's Unix allowlist (before the capacity check).
        let mut agent_socket = vec![false; set.policies.len()];
        if let Some(path) = &self.agent_socket {
            for ((p, c), added) in set
                .policies
                .iter()
                .zip(&mut compiled)
                .zip(&mut agent_socket)
            {
                *added = policy::allow_agent_socket(p, c, path);
            }
        }
        self.check_capacity(&set, &compiled)?;
        let generation = self.generation + 1;
        let mut fresh: BTreeMap<String, Installed> = BTreeMap::new();
        let mut metas = Vec::new();
        for ((p, c), with_agent_socket) in set.policies.iter().zip(compiled).zip(agent_socket) {
            let id = self.next_policy_id;
            self.next_policy_id = self
                .next_policy_id
                .checked_add(1)
                .context("policy ids exhausted")?;
            let keys = PrefixKeys::of(&c);
            if let Err(e) = self.enforcer.install_rules(id, &c) {
                let _ = self.enforcer.remove_rules(id, &keys);
                for inst in fresh.values() {
                    let _ = self.enforcer.remove_rules(inst.id, &inst.keys);
                }
                return Err(e).with_context(|| format!("installing policy {}", p.name));
            }
            metas.push((
                id,
                PolicyMeta {
                    name: p.name.clone(),
                    version: generation,
                    rules: p.rules.iter().map(|r| r.name.clone()).collect(),
                    unix: p
                        .unix
                        .iter()
                        .map(|u| u.to_string())
                        .chain(self.agent_socket.clone().filter(|_| with_agent_socket))
                        .collect(),
                },
            ));
            fresh.insert(
                p.name.clone(),
                Installed {
                    id,
                    keys,
                    mode: p.mode.as_kernel(),
                },
            );
        }
        {
            let mut names = self.names.write().expect("names");
            for (id, m) in metas {
                names.policies.insert(id, m);
            }
        }
        let old = std::mem::replace(&mut self.installed, fresh);
        self.set = set;
        self.generation = generation;
        self.warn_root_level_selectors();
        // Watches before agents, then every existing cgroup re-judged; entries of cgroups the
        // new set no longer covers go.
        self.install_watches();
        self.rescan();
        self.policy_digest = Some(digest);
        // A program that read an entry before its switch may still look up that entry's old
        // policy id: the old rules go only once every program run started before is over.
        if !old.is_empty() {
            wait_for_running_programs();
        }
        for inst in old.values() {
            if let Err(e) = self.enforcer.remove_rules(inst.id, &inst.keys) {
                tracing::warn!(policy_id = inst.id, "removing old rules: {e}");
            }
        }
        // Selectors, modes, names and host rules (the DNS proxy judges names here) are all the
        // controller needs from here on; the address rules live in the kernel. Freed heap goes
        // back to the system (a 100k-rule load peaks high).
        for p in &mut self.set.policies {
            p.rules.retain(|r| r.is_host_rule());
            p.rules.shrink_to_fit();
        }
        // Names resolved under the old policies: kept only if the new ones still allow them.
        self.rejudge_resolved();
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only returns free heap pages to the kernel.
        unsafe {
            libc::malloc_trim(0);
        }
        tracing::info!(
            generation,
            policies = self.installed.len(),
            "policy applied"
        );
        Ok(())
    }

    /// Old and new rules sit in the tries together until the switch is done: both must fit.
    /// The same check as `agentwall policy check`, with what is installed counted.
    fn check_capacity(&self, set: &PolicySet, compiled: &[CompiledPolicy]) -> Result<()> {
        let need: Vec<(&Path, policy::Usage)> = set
            .policies
            .iter()
            .zip(compiled)
            .map(|(p, c)| (p.source.as_path(), policy::Usage::of(c)))
            .collect();
        let installed = self
            .installed
            .values()
            .map(|i| policy::Usage {
                v4: i.keys.v4.len(),
                v6: i.keys.v6.len(),
                unix: i.keys.unix.len(),
            })
            .sum();
        Ok(policy::check_capacity(&need, installed)?)
    }

    fn warn_root_level_selectors(&self) {
        for (policy, selector) in super::registry::root_level_selectors(&self.set) {
            tracing::warn!(
                policy = %policy,
                selector = %selector,
                "SELECTOR AT THE CGROUP2 ROOT: a new cgroup it matches runs UNENFORCED until the \
                 controller registers it (no pending fallback: the kernel cannot tell such a \
                 cgroup from any other on the node). Put agents below a parent cgroup, e.g. \
                 agentwall/{selector}"
            );
        }
    }
}

/// Returns once every BPF program run that started before the call has finished. cgroup
/// programs run inside an RCU read-side section; `membarrier(MEMBARRIER_CMD_GLOBAL)` waits for
/// an RCU grace period (a few milliseconds). Where it is refused (nohz_full kernels), a pause
/// far longer than any program run does the same in practice.
fn wait_for_running_programs() {
    // linux/membarrier.h
    const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
    // SAFETY: membarrier takes no pointers.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc != 0 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
