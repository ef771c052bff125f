//! Turning the raw samples into the figures: medians with min and max, ratios to the floor of
//! the same round, the goals, and the printed tables (Markdown, so README can carry them).

use std::fmt::Write as _;

use serde::Serialize;

use crate::{
    configs::{Config, EventCheck, Kind, SetupInfo},
    daemon::ControlRep,
    runtime::RuntimeRep,
    stats::{self, Spread},
    sys::Machine,
    Workload,
};

/// Goal: a cgroup made alone is registered within this (p99), see docs/benchmarks.md.
const REG_SINGLE_P99_MS: f64 = 50.0;
/// Goal: each of 100 cgroups made at once is registered within this (p99).
const REG_BATCH_P99_MS: f64 = 100.0;
/// Goal: a grant or revoke is in force in the kernel within this of the call returning (p99).
const GRANT_P99_US: f64 = 1000.0;
/// Goal: the agent's TCP connect rate with 1,000 live grants, against the floor.
const GRANTS_TCP_VS_FLOOR: f64 = 0.97;

/// One timed workload run.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub config: String,
    pub workload: Workload,
    pub round: usize,
    pub ops: u64,
    pub ns: u64,
    /// agentwall configurations: CPU time of the in-process controller during the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller_cpu_ns: Option<u64>,
    /// agentwall configurations: decisions the kernel counted during the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decisions: Option<u64>,
}

impl Sample {
    pub fn ns_per_op(&self) -> f64 {
        self.ns as f64 / self.ops.max(1) as f64
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SetupRecord {
    pub config: String,
    pub round: usize,
    #[serde(flatten)]
    pub info: SetupInfo,
}

#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    pub config: String,
    pub round: usize,
    #[serde(flatten)]
    pub check: EventCheck,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub quick: bool,
    /// `--only`: the subset of rows run (none: all).
    pub only: Option<crate::Only>,
    pub rounds: usize,
    pub tcp_ops: u64,
    pub udp_ops: u64,
    pub syscall_ops: u64,
    pub exec_ops: u64,
    pub proxy_ops: u64,
    /// Warm-up operations before each timed run: ops / this.
    pub warmup_divisor: u64,
    /// Pause after each set-up and teardown, so the kernel's deferred work (freeing a trie,
    /// an RCU grace period) does not land in the next measurement.
    pub quiesce_ms: u64,
    /// Longest wait before a round for other processes to go quiet.
    pub idle_wait_s: f64,
    /// The controller's ring-buffer wake-up threshold used (bytes).
    pub wakeup_bytes: u64,
    pub updates: usize,
    /// Registration test, per round: cgroups made one at a time, then this many at once.
    pub reg_singles: usize,
    pub reg_batch: usize,
    pub small_rules: usize,
    pub large_rules: usize,
    /// Runtime control, per round: grant/revoke cycles, revoke-to-reset samples, and the
    /// agent's live grants during its TCP loop.
    pub grant_cycles: usize,
    pub reset_samples: usize,
    pub live_grants: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoundInfo {
    pub round: usize,
    pub wall_s: f64,
    /// CPU time other processes on the machine used during the round.
    pub foreign_cpu_s: f64,
    /// Time spent before the round waiting for other processes to go quiet.
    pub idle_wait_s: f64,
}

/// Everything one run measured.
pub struct Raw {
    pub machine: Machine,
    pub plan: Plan,
    pub configs: Vec<Config>,
    pub samples: Vec<Sample>,
    pub setups: Vec<SetupRecord>,
    pub events: Vec<EventRecord>,
    pub control: Vec<ControlRep>,
    pub runtime: Vec<RuntimeRep>,
    pub rounds: Vec<RoundInfo>,
    /// The DNS proxy's rows (not with `--only`).
    pub dns: Option<crate::dns::DnsSummary>,
    pub started_unix: u64,
    pub duration_s: f64,
    pub command: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub workload: Workload,
    pub workload_label: &'static str,
    pub config: String,
    pub config_label: String,
    pub us_per_op: Spread,
    pub ops_per_s_median: f64,
    /// floor time / this time, per round (higher is better; 1 is the floor).
    pub vs_floor: Spread,
    pub per_round_us: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Goal {
    pub goal: String,
    pub target: String,
    pub measured: String,
    pub pass: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ControlSummary {
    pub rules: usize,
    pub trie_entries: usize,
    pub parse_ms: Spread,
    pub compile_ms: Spread,
    pub load_ms: Spread,
    pub peak_rss_delta_mib: Spread,
    pub daemon_start_ms: Spread,
    pub daemon_rss_mib: Spread,
    pub daemon_anon_mib: Spread,
    pub daemon_rss_after_trim_mib: Spread,
    pub trie_v4_mib: Spread,
    pub maps_total_mib: Spread,
    pub update_p50_us: f64,
    pub update_p99_us: f64,
    pub update_max_us: f64,
    pub updates: usize,
    pub tcp_during_updates_vs_floor: Option<Spread>,
    pub nft_load_ms: Option<Spread>,
    pub registration: RegSummary,
    pub reps: Vec<ControlRep>,
}

/// Runtime control, pooled over the rounds (µs), and the connect rate per round.
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeSummary {
    pub grant_us: Pct,
    pub revoke_us: Pct,
    /// The grant and revoke calls themselves (called to returned), µs.
    pub grant_call_us: Pct,
    pub revoke_call_us: Pct,
    /// Samples of grant_us / revoke_us over the goal, and how many of those the agent's loop
    /// spent at least half of waiting on a run queue (the scheduler's time, not agentwall's).
    pub over_goal: usize,
    pub over_goal_mostly_waiting: usize,
    /// A grant call with about `live_grants` live grants of the agent (the last 100 made), µs.
    pub grant_call_full_us: Pct,
    pub reset_us: Pct,
    pub resets_rst: usize,
    pub resets_eof: usize,
    pub live_grants: usize,
    /// The agent's TCP loop with that many live grants: µs per connection, and floor / it.
    pub tcp_with_grants_us: Spread,
    pub tcp_with_grants_vs_floor: Spread,
    /// The same loop from a sub-agent (its rule, then the agent's grant): µs, floor / it.
    pub tcp_sub_agent_us: Spread,
    pub tcp_sub_agent_vs_floor: Spread,
    pub reps: Vec<RuntimeRep>,
}

/// Percentiles of a pooled sample (nearest rank).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Pct {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub n: usize,
}

impl Pct {
    pub fn of(v: &[f64]) -> Pct {
        let p = |q| stats::percentile(v, q).unwrap_or(f64::NAN);
        Pct {
            p50: p(50.0),
            p99: p(99.0),
            max: p(100.0),
            n: v.len(),
        }
    }
}

/// mkdir of a selected cgroup to its agent entry in the kernel (ms), pooled over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct RegSummary {
    pub single_ms: Pct,
    pub batch_size: usize,
    pub batch_ms: Pct,
    /// Per round: the batch's first mkdir to its last entry.
    pub batch_all_ms: Spread,
    pub removal_ms: Pct,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: u32,
    pub command: String,
    pub started_unix: u64,
    pub duration_s: f64,
    pub machine: Machine,
    pub machine_line: String,
    pub plan: Plan,
    pub rows: Vec<Row>,
    pub control: ControlSummary,
    pub runtime: RuntimeSummary,
    pub events: Vec<EventRecord>,
    pub lost_events_total: u64,
    /// Per agentwall configuration: the in-process controller's CPU time per decision, over
    /// all its workload runs.
    pub controller_cpu_per_decision_us: Vec<(String, f64)>,
    pub rounds: Vec<RoundInfo>,
    /// CPU time other processes used during the whole run.
    pub foreign_cpu_s: f64,
    pub goals: Vec<Goal>,
    /// The DNS proxy's rows (not with `--only`).
    pub dns: Option<crate::dns::DnsSummary>,
    pub setups: Vec<SetupRecord>,
    pub samples: Vec<Sample>,
}

fn mib(kib: f64) -> f64 {
    kib / 1024.0
}

fn pool(reps: &[ControlRep], f: impl Fn(&ControlRep) -> &Vec<f64>) -> Vec<f64> {
    reps.iter().flat_map(|r| f(r).iter().copied()).collect()
}

fn spread_of(v: impl IntoIterator<Item = f64>) -> Spread {
    let v: Vec<f64> = v.into_iter().collect();
    Spread::of(&v).unwrap_or(Spread {
        median: f64::NAN,
        min: f64::NAN,
        max: f64::NAN,
        n: 0,
    })
}

impl Raw {
    fn sample(&self, config: &str, w: Workload, round: usize) -> Option<&Sample> {
        self.samples
            .iter()
            .find(|s| s.config == config && s.workload == w && s.round == round)
    }

    /// Per-round ratios floor / config for a workload (the proxy's floor is the direct TCP).
    fn ratios(&self, config: &str, w: Workload) -> Vec<f64> {
        (0..self.plan.rounds)
            .filter_map(|r| {
                let f = self.sample("floor", w.floor(), r)?;
                let s = self.sample(config, w, r)?;
                Some(f.ns_per_op() / s.ns_per_op())
            })
            .collect()
    }

    pub fn report(self) -> Report {
        let mut rows = Vec::new();
        for w in Workload::ALL {
            for c in &self.configs {
                let per: Vec<f64> = (0..self.plan.rounds)
                    .filter_map(|r| self.sample(&c.id, w, r))
                    .map(|s| s.ns_per_op() / 1e3)
                    .collect();
                if per.is_empty() {
                    continue;
                }
                let us = spread_of(per.iter().copied());
                rows.push(Row {
                    workload: w,
                    workload_label: w.label(),
                    config: c.id.clone(),
                    config_label: c.label.clone(),
                    us_per_op: us,
                    ops_per_s_median: 1e6 / us.median,
                    vs_floor: spread_of(self.ratios(&c.id, w)),
                    per_round_us: per,
                });
            }
        }

        let large = self.plan.large_rules;
        let reps = &self.control;
        let pooled: Vec<f64> = reps
            .iter()
            .flat_map(|r| r.update_samples_ns.iter().copied())
            .collect();
        let pct = |p: f64| stats::percentile(&pooled, p).unwrap_or(f64::NAN) / 1e3;
        let trie = |r: &ControlRep| {
            r.daemon
                .maps
                .iter()
                .filter(|m| m.name == "AW_RULES_V4")
                .map(|m| m.memlock_bytes as f64)
                .sum::<f64>()
        };
        let floor_tcp: Vec<(usize, f64)> = (0..self.plan.rounds)
            .filter_map(|r| {
                self.sample("floor", Workload::TcpAgent, r)
                    .map(|s| (r, s.ns_per_op()))
            })
            .collect();
        let during: Vec<f64> = reps
            .iter()
            .filter_map(|rep| {
                let f = floor_tcp.iter().find(|(r, _)| *r == rep.round)?.1;
                Some(f / rep.tcp_during_updates_ns_per_op)
            })
            .collect();
        let nft_large = Config::new(Kind::Nft { rules: large }).id;
        let nft_ms: Vec<f64> = self
            .setups
            .iter()
            .filter(|s| s.config == nft_large)
            .map(|s| s.info.setup_ms)
            .collect();
        let control = ControlSummary {
            rules: large,
            trie_entries: reps.first().map(|r| r.load.trie_entries).unwrap_or(0),
            parse_ms: spread_of(reps.iter().map(|r| r.load.parse_ms)),
            compile_ms: spread_of(reps.iter().map(|r| r.load.compile_ms)),
            load_ms: spread_of(reps.iter().map(|r| r.load.start_ms)),
            peak_rss_delta_mib: spread_of(reps.iter().map(|r| mib(r.load.peak_delta_kib as f64))),
            daemon_start_ms: spread_of(reps.iter().map(|r| r.daemon.start_ms)),
            daemon_rss_mib: spread_of(reps.iter().map(|r| mib(r.daemon.rss_kib as f64))),
            daemon_anon_mib: spread_of(reps.iter().map(|r| mib(r.daemon.anon_kib as f64))),
            daemon_rss_after_trim_mib: spread_of(
                reps.iter().map(|r| mib(r.daemon.rss_after_trim_kib as f64)),
            ),
            trie_v4_mib: spread_of(reps.iter().map(|r| trie(r) / 1048576.0)),
            maps_total_mib: spread_of(reps.iter().map(|r| {
                r.daemon
                    .maps
                    .iter()
                    .map(|m| m.memlock_bytes as f64)
                    .sum::<f64>()
                    / 1048576.0
            })),
            update_p50_us: pct(50.0),
            update_p99_us: pct(99.0),
            update_max_us: pct(100.0),
            updates: pooled.len(),
            tcp_during_updates_vs_floor: Spread::of(&during),
            nft_load_ms: Spread::of(&nft_ms),
            registration: RegSummary {
                single_ms: Pct::of(&pool(reps, |r| &r.registration.single_ms)),
                batch_size: self.plan.reg_batch,
                batch_ms: Pct::of(&pool(reps, |r| &r.registration.batch_ms)),
                batch_all_ms: spread_of(reps.iter().map(|r| r.registration.batch_all_ms)),
                removal_ms: Pct::of(&pool(reps, |r| &r.registration.removal_ms)),
            },
            reps: reps.clone(),
        };

        let rt = &self.runtime;
        let rt_pool = |f: fn(&RuntimeRep) -> &Vec<f64>| -> Vec<f64> {
            rt.iter().flat_map(|r| f(r).iter().copied()).collect()
        };
        // Each latency sample beside the agent's run-queue wait in its window.
        let paired: Vec<(f64, f64)> = rt
            .iter()
            .flat_map(|r| {
                let f = &r.figures;
                f.grant_us
                    .iter()
                    .zip(&f.grant_wait_us)
                    .chain(f.revoke_us.iter().zip(&f.revoke_wait_us))
                    .map(|(l, w)| (*l, *w))
            })
            .filter(|(l, _)| *l >= GRANT_P99_US)
            .collect();
        let runtime = RuntimeSummary {
            grant_us: Pct::of(&rt_pool(|r| &r.figures.grant_us)),
            revoke_us: Pct::of(&rt_pool(|r| &r.figures.revoke_us)),
            grant_call_us: Pct::of(&rt_pool(|r| &r.figures.grant_call_us)),
            revoke_call_us: Pct::of(&rt_pool(|r| &r.figures.revoke_call_us)),
            over_goal: paired.len(),
            over_goal_mostly_waiting: paired.iter().filter(|(l, w)| 2.0 * w >= *l).count(),
            grant_call_full_us: Pct::of(&rt_pool(|r| &r.figures.grant_call_full_us)),
            reset_us: Pct::of(&rt_pool(|r| &r.figures.reset_us)),
            resets_rst: rt.iter().map(|r| r.figures.resets_rst).sum(),
            resets_eof: rt.iter().map(|r| r.figures.resets_eof).sum(),
            live_grants: rt.iter().map(|r| r.figures.live_grants).min().unwrap_or(0),
            tcp_with_grants_us: spread_of(
                rt.iter().map(|r| r.figures.tcp_with_grants_ns_per_op / 1e3),
            ),
            tcp_with_grants_vs_floor: spread_of(rt.iter().filter_map(|rep| {
                let f = floor_tcp.iter().find(|(r, _)| *r == rep.round)?.1;
                Some(f / rep.figures.tcp_with_grants_ns_per_op)
            })),
            tcp_sub_agent_us: spread_of(rt.iter().map(|r| r.figures.tcp_sub_agent_ns_per_op / 1e3)),
            tcp_sub_agent_vs_floor: spread_of(rt.iter().filter_map(|rep| {
                let f = floor_tcp.iter().find(|(r, _)| *r == rep.round)?.1;
                (rep.figures.tcp_sub_agent_ns_per_op > 0.0)
                    .then(|| f / rep.figures.tcp_sub_agent_ns_per_op)
            })),
            reps: rt.clone(),
        };

        let mut events = self.events.clone();
        for rep in reps {
            events.push(EventRecord {
                config: "control-plane daemon".into(),
                round: rep.round,
                check: rep.events.clone(),
            });
        }
        let lost_total: u64 = events.iter().map(|e| e.check.lost()).sum();

        let enforce_large = Config::new(Kind::Agentwall {
            rules: large,
            audit: false,
        })
        .id;
        let k = crate::configs::short_count(large);
        let row = |w: Workload| {
            rows.iter()
                .find(|r| r.workload == w && r.config == enforce_large)
                .map(|r| r.vs_floor)
        };
        let ratio_goal = |goal: String, w: Workload, target: f64| {
            let s = row(w);
            Goal {
                goal,
                target: format!(">= {target:.2}"),
                measured: s
                    .map(|s| format!("{:.3} [{:.3}-{:.3}]", s.median, s.min, s.max))
                    .unwrap_or_else(|| "not measured".into()),
                pass: s.is_some_and(|s| s.median >= target),
            }
        };
        let mut goals = vec![
            ratio_goal(
                format!("TCP connect rate, agentwall enforcing + logging, {k} rules / floor"),
                Workload::TcpAgent,
                0.97,
            ),
            ratio_goal(
                format!("UDP sendto rate (unconnected), enforcing + logging, {k} rules / floor"),
                Workload::UdpAgent,
                0.80,
            ),
            ratio_goal(
                format!("UDP send rate (connected), enforcing + logging, {k} rules / floor"),
                Workload::UdpcAgent,
                0.80,
            ),
            ratio_goal(
                format!("TCP connect rate of a non-agent, agentwall {k} attached / floor"),
                Workload::TcpOther,
                0.99,
            ),
            ratio_goal(
                format!("UDP sendto rate of a non-agent, agentwall {k} attached / floor"),
                Workload::UdpOther,
                0.99,
            ),
            ratio_goal(
                format!("getppid() rate of a non-agent, agentwall {k} attached / floor"),
                Workload::SyscallOther,
                0.97,
            ),
            ratio_goal(
                format!(
                    "fork+exec+wait rate of a non-agent, agentwall {k} attached (exec \
                     tracking) / floor"
                ),
                Workload::ExecOther,
                0.97,
            ),
        ];
        let reg = &control.registration;
        goals.push(Goal {
            goal: format!(
                "a new selected cgroup registered (mkdir to agent entry), one at a time, p99 \
                 of {}",
                reg.single_ms.n
            ),
            target: format!("< {REG_SINGLE_P99_MS:.0} ms"),
            measured: format!("{:.2} ms", reg.single_ms.p99),
            pass: reg.single_ms.n > 0 && reg.single_ms.p99 < REG_SINGLE_P99_MS,
        });
        goals.push(Goal {
            goal: format!(
                "{} new selected cgroups at once, each registered, p99 of {}",
                reg.batch_size, reg.batch_ms.n
            ),
            target: format!("< {REG_BATCH_P99_MS:.0} ms"),
            measured: format!("{:.2} ms", reg.batch_ms.p99),
            pass: reg.batch_ms.n > 0 && reg.batch_ms.p99 < REG_BATCH_P99_MS,
        });
        let us_goal = |what: &str, p: &Pct| Goal {
            goal: format!(
                "{what}, p99 of {} (a connect loop of the agent running)",
                p.n
            ),
            target: format!("< {GRANT_P99_US:.0} µs"),
            measured: format!("{:.0} µs (p50 {:.0} µs)", p.p99, p.p50),
            pass: p.n > 0 && p.p99 < GRANT_P99_US,
        };
        let runtime_goals = goals.len();
        goals.push(us_goal(
            "grant returned to the kernel allowing the agent",
            &runtime.grant_us,
        ));
        goals.push(us_goal(
            "revoke returned to the kernel refusing the agent",
            &runtime.revoke_us,
        ));
        let g = &runtime.tcp_with_grants_vs_floor;
        goals.push(Goal {
            goal: format!(
                "TCP connect rate of an agent with {} live grants (allowed by one) and a rate limit / floor",
                runtime.live_grants
            ),
            target: format!(">= {GRANTS_TCP_VS_FLOOR:.2}"),
            measured: format!("{:.3} [{:.3}-{:.3}]", g.median, g.min, g.max),
            pass: g.n > 0 && g.median >= GRANTS_TCP_VS_FLOOR,
        });
        let g = &runtime.tcp_sub_agent_vs_floor;
        goals.push(Goal {
            goal: "TCP connect rate of a sub-agent (its rule, then its parent's grant among \
                   1,000) / floor"
                .into(),
            target: format!(">= {GRANTS_TCP_VS_FLOOR:.2}"),
            measured: format!("{:.3} [{:.3}-{:.3}]", g.median, g.min, g.max),
            pass: g.n > 0 && g.median >= GRANTS_TCP_VS_FLOOR,
        });
        if self.plan.only == Some(crate::Only::Runtime) {
            // The other goals' rows did not run.
            goals.drain(..runtime_goals);
        }
        let runtime_goals = goals.len();
        let decisions: u64 = events.iter().map(|e| e.check.decisions).sum();
        goals.push(Goal {
            goal: format!(
                "lost events, every agentwall run ({} runs, {decisions} decisions)",
                events.len()
            ),
            target: "0".into(),
            measured: lost_total.to_string(),
            pass: lost_total == 0 && !events.is_empty(),
        });
        goals.push(Goal {
            goal: format!("{k} rules compiled and loaded (controller start, median)"),
            target: "< 500 ms".into(),
            measured: format!("{:.0} ms", control.load_ms.median),
            pass: control.load_ms.median < 500.0,
        });
        goals.push(Goal {
            goal: format!("daemon's own memory (RssAnon) with {k} rules loaded (median)"),
            target: "< 64 MiB".into(),
            measured: format!("{:.1} MiB", control.daemon_anon_mib.median),
            pass: control.daemon_anon_mib.median < 64.0,
        });

        if self.plan.only == Some(crate::Only::Runtime) {
            goals.truncate(runtime_goals);
        }
        if let Some(d) = &self.dns {
            goals.extend(d.goals());
        }
        let mut cpu_per_decision = Vec::new();
        for c in &self.configs {
            let (cpu, d) = self
                .samples
                .iter()
                .filter(|s| s.config == c.id)
                .filter_map(|s| Some((s.controller_cpu_ns?, s.decisions?)))
                .fold((0u64, 0u64), |a, b| (a.0 + b.0, a.1 + b.1));
            if d > 0 {
                cpu_per_decision.push((c.id.clone(), cpu as f64 / d as f64 / 1e3));
            }
        }
        let foreign_cpu_s = self.rounds.iter().map(|r| r.foreign_cpu_s).sum();

        Report {
            schema: 1,
            command: self.command,
            started_unix: self.started_unix,
            duration_s: self.duration_s,
            machine_line: self.machine.line(),
            machine: self.machine,
            plan: self.plan,
            rows,
            control,
            runtime,
            events,
            lost_events_total: lost_total,
            controller_cpu_per_decision_us: cpu_per_decision,
            rounds: self.rounds,
            foreign_cpu_s,
            goals,
            dns: self.dns,
            setups: self.setups,
            samples: self.samples,
        }
    }
}

fn sp(s: &Spread, digits: usize) -> String {
    format!("{:.d$} [{:.d$}–{:.d$}]", s.median, s.min, s.max, d = digits)
}

fn rate(ops_per_s: f64) -> String {
    if ops_per_s >= 1000.0 {
        format!("{:.1} k/s", ops_per_s / 1000.0)
    } else {
        format!("{ops_per_s:.0} /s")
    }
}

impl Report {
    /// The tables as Markdown.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let p = &self.plan;
        let _ = writeln!(
            o,
            "agentwall bench ({}): {} rounds, configurations interleaved in each round; \
             {} TCP connections, {} UDP sends, {} getppid() calls, {} fork+exec+waits, {} \
             proxied connections per run",
            if p.quick { "quick" } else { "full" },
            p.rounds,
            p.tcp_ops,
            p.udp_ops,
            p.syscall_ops,
            p.exec_ops,
            p.proxy_ops
        );
        let _ = writeln!(o, "machine: {}", self.machine_line);
        let _ = writeln!(o, "command: {}", self.command);
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "| workload | configuration | µs per op, median [min–max] | rate | vs floor, median [min–max] |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|");
        for r in &self.rows {
            let vs = if r.config == "floor" {
                "1 (floor)".to_string()
            } else {
                sp(&r.vs_floor, 3)
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} |",
                r.workload_label,
                r.config_label,
                sp(&r.us_per_op, 2),
                rate(r.ops_per_s_median),
                vs
            );
        }
        // `--only runtime`: the control-plane and event tables have nothing in them.
        let full = self.plan.only.is_none();
        if full {
            let c = &self.control;
            let k = crate::configs::short_count(c.rules);
            let _ = writeln!(o);
            let _ = writeln!(
            o,
            "| control plane, {k} rules + 1 ({} trie entries) | median [min–max] over {} runs |",
            c.trie_entries,
            c.reps.len()
        );
            let _ = writeln!(o, "|---|---|");
            let mut line = |what: &str, v: String| {
                let _ = writeln!(o, "| {what} | {v} |");
            };
            line(
                "parse the YAML policy (not part of the load goal)",
                format!("{} ms", sp(&c.parse_ms, 0)),
            );
            line("compile alone", format!("{} ms", sp(&c.compile_ms, 0)));
            line(
                "compile + load programs + install into the trie + attach (controller start)",
                format!("{} ms", sp(&c.load_ms, 0)),
            );
            line(
                "peak RSS added by that",
                format!("{} MiB", sp(&c.peak_rss_delta_mib, 1)),
            );
            line(
                "daemon start from the policy directory (parse included)",
                format!("{} ms", sp(&c.daemon_start_ms, 0)),
            );
            line(
                "daemon's own memory (RssAnon) with the rules loaded",
                format!("{} MiB", sp(&c.daemon_anon_mib, 1)),
            );
            line(
                "daemon RSS with the rules loaded (the event ring mapped twice included)",
                format!("{} MiB", sp(&c.daemon_rss_mib, 1)),
            );
            line(
                "the same after malloc_trim(0) (freed heap given back; diagnostic)",
                format!("{} MiB", sp(&c.daemon_rss_after_trim_mib, 1)),
            );
            line(
                "kernel memory of the IPv4 trie (fdinfo memlock)",
                format!("{} MiB", sp(&c.trie_v4_mib, 1)),
            );
            line(
                "kernel memory of all agentwall maps (event ring included)",
                format!("{} MiB", sp(&c.maps_total_mib, 1)),
            );
            line(
            &format!(
                "one LPM insert while an agent's TCP connect loop runs ({} inserts): p50 / p99 / max",
                c.updates
            ),
            format!(
                "{:.1} / {:.1} / {:.1} µs",
                c.update_p50_us, c.update_p99_us, c.update_max_us
            ),
        );
            if let Some(s) = &c.tcp_during_updates_vs_floor {
                line("that TCP loop's rate vs floor", sp(s, 3));
            }
            if let Some(s) = &c.nft_load_ms {
                line(
                    &format!("for comparison: nft -f of the same policy ({k}-element set)"),
                    format!("{} ms", sp(s, 0)),
                );
            }
            let r = &c.registration;
            let pct = |p: &Pct| format!("{:.2} / {:.2} / {:.2} ms", p.p50, p.p99, p.max);
            line(
                &format!(
                    "a new cgroup a policy selects, mkdir to its agent entry (inotify), one at a \
                 time ({}): p50 / p99 / max",
                    r.single_ms.n
                ),
                pct(&r.single_ms),
            );
            line(
                &format!(
                    "the same, {} made at once ({} in all): p50 / p99 / max",
                    r.batch_size, r.batch_ms.n
                ),
                pct(&r.batch_ms),
            );
            line(
                &format!("those {}: first mkdir to the last registered", r.batch_size),
                format!("{} ms", sp(&r.batch_all_ms, 1)),
            );
            line(
                &format!(
                    "rmdir of a registered cgroup to its entry removed ({}): p50 / p99 / max",
                    r.removal_ms.n
                ),
                pct(&r.removal_ms),
            );
        }
        let rt = &self.runtime;
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "| runtime control (its own controller; pooled over {} rounds) | figure |",
            rt.reps.len()
        );
        let _ = writeln!(o, "|---|---|");
        let us = |p: &Pct| format!("{:.0} / {:.0} / {:.0} µs", p.p50, p.p99, p.max);
        let mut line = |what: &str, v: String| {
            let _ = writeln!(o, "| {what} | {v} |");
        };
        line(
            &format!(
                "grant returned to the agent's first connect allowed, its connect loop \
                 running ({}): p50 / p99 / max",
                rt.grant_us.n
            ),
            us(&rt.grant_us),
        );
        line(
            &format!(
                "revoke returned to the agent's first connect refused (EPERM) ({}): p50 / \
                 p99 / max",
                rt.revoke_us.n
            ),
            us(&rt.revoke_us),
        );
        line(
            &format!(
                "the calls themselves, called to returned (kernel map written inside): grant / \
                 revoke p50 and p99 ({})",
                rt.grant_call_us.n
            ),
            format!(
                "{:.0} / {:.0} µs; {:.0} / {:.0} µs",
                rt.grant_call_us.p50,
                rt.grant_call_us.p99,
                rt.revoke_call_us.p50,
                rt.revoke_call_us.p99
            ),
        );
        line(
            &format!(
                "grant and revoke samples at or over {GRANT_P99_US:.0} µs: of them, the agent's \
                 connect loop waited on a run queue (its CPU taken) half the time or more"
            ),
            format!("{} of {}", rt.over_goal_mostly_waiting, rt.over_goal),
        );
        line(
            &format!(
                "revoke called to the server seeing the agent's live connection end ({}; \
                 {} RST, {} EOF): p50 / p99 / max",
                rt.reset_us.n, rt.resets_rst, rt.resets_eof
            ),
            us(&rt.reset_us),
        );
        line(
            &format!(
                "the agent's TCP connect+close with {} live grants, allowed by one: µs per op",
                rt.live_grants
            ),
            sp(&rt.tcp_with_grants_us, 2),
        );
        line("that rate vs floor", sp(&rt.tcp_with_grants_vs_floor, 3));
        line(
            "the same loop from a sub-agent inside it (its rule, then the agent's grant): µs per op",
            sp(&rt.tcp_sub_agent_us, 2),
        );
        line("that rate vs floor", sp(&rt.tcp_sub_agent_vs_floor, 3));
        line(
            &format!(
                "a grant call with about {} live grants of the agent (the last 100 made; {}): \
                 p50 / p99 / max",
                rt.live_grants, rt.grant_call_full_us.n
            ),
            us(&rt.grant_call_full_us),
        );
        line(
            "the rate limit on that agent (every call takes a token)",
            "1,000,000/s, burst 1,000,000: the rows above include its cost".into(),
        );
        if full {
            let _ = writeln!(o);
            let _ = writeln!(
            o,
            "| events, per configuration (all rounds) | decisions | records in the audit log | lost | longest audit-log catch-up after a run | controller CPU per decision |"
        );
            let _ = writeln!(o, "|---|---|---|---|---|---|");
            let mut names: Vec<&str> = Vec::new();
            for e in &self.events {
                if !names.contains(&e.config.as_str()) {
                    names.push(&e.config);
                }
            }
            for n in names {
                let es: Vec<&EventCheck> = self
                    .events
                    .iter()
                    .filter(|e| e.config == n)
                    .map(|e| &e.check)
                    .collect();
                let cpu = self
                    .controller_cpu_per_decision_us
                    .iter()
                    .find(|(c, _)| c == n)
                    .map(|(_, us)| format!("{us:.1} µs"))
                    .unwrap_or_else(|| "–".into());
                let label = self
                    .rows
                    .iter()
                    .find(|r| r.config == n)
                    .map_or(n, |r| r.config_label.as_str());
                let _ = writeln!(
                    o,
                    "| {label} | {} | {} | {} | {:.0} ms | {cpu} |",
                    es.iter().map(|e| e.decisions).sum::<u64>(),
                    es.iter().map(|e| e.records).sum::<u64>(),
                    es.iter().map(|e| e.lost()).sum::<u64>(),
                    es.iter().map(|e| e.catch_up_ms_max).fold(0.0, f64::max)
                );
            }
        }
        if let Some(d) = &self.dns {
            let _ = writeln!(o);
            o.push_str(&d.render());
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "| goal | target | measured | result |");
        let _ = writeln!(o, "|---|---|---|---|");
        for g in &self.goals {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} |",
                g.goal,
                g.target,
                g.measured,
                if g.pass { "PASS" } else { "MISS" }
            );
        }
        let _ = writeln!(o);
        let wall: f64 = self.rounds.iter().map(|r| r.wall_s).sum();
        let disturbed = self
            .rounds
            .iter()
            .filter(|r| r.foreign_cpu_s > crate::FOREIGN_CPU_WARN * r.wall_s)
            .count();
        let _ = writeln!(
            o,
            "Other processes on the machine used {:.1} CPU-seconds during the rounds ({:.1} % of \
             one CPU); {disturbed} of {} rounds were disturbed (over {:.0} %); the bench waited \
             {:.0} s in all for quiet before rounds.",
            self.foreign_cpu_s,
            100.0 * self.foreign_cpu_s / wall.max(1e-9),
            self.rounds.len(),
            100.0 * crate::FOREIGN_CPU_WARN,
            self.rounds.iter().map(|r| r.idle_wait_s).sum::<f64>()
        );
        let _ = writeln!(
            o,
            "Ran in {:.0} s. Ratios are floor time / configuration time within each round \
             (1 = as fast as nothing attached). Noise on this kind of VM is about ±10 % between \
             rounds; MISS marks a goal not met in this run, it does not fail the bench.",
            self.duration_s
        );
        o
    }
}
