//! Loads the eBPF object, attaches its programs at the cgroup2 root and owns the typed handles to
//! its maps. Nothing else in the controller touches a kernel map.

use std::{
    collections::BTreeSet,
    ffi::CString,
    fs::File,
    io,
    net::{IpAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{
        lpm_trie::Key, Array, HashMap, IterableMap, LpmTrie, MapData, MapError, PerCpuArray,
        PerCpuValues, RingBuf,
    },
    programs::{
        links::FdLink, BtfTracePoint, CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramError,
    },
    Btf, Ebpf, EbpfError, EbpfLoader,
};
use thiserror::Error;

use agent_common::{
    counter, names, AgentEntry, Config, DnsConfig, DnsSock, ExePath, GrantKeyV4, GrantKeyV6,
    GrantSet, PrefixV4, PrefixV6, RuleSet, UnixKey, UnixRule, GRANT_AGENT_BITS, POLICY_PREFIX_BITS,
    UNIX_PATH_MAX,
};

use crate::policy::CompiledPolicy;

pub mod btf;
pub mod exec_track;
pub mod fake;
pub mod kernel_state;
pub mod lock;
pub mod pin;
pub mod sock_diag;
pub mod socket_guard;
pub mod sys;
pub mod unix_hooks;

use pin::PinError;
use unix_hooks::{UnixHookError, UnixProgram};

/// The eBPF object, built from agent-ebpf by build.rs into OUT_DIR.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/agent-ebpf.o"));

/// Bytes pending in the ring buffer before a program wakes the consumer (see agent-ebpf).
pub const DEFAULT_WAKEUP_BYTES: u64 = 256 * 1024;

#[derive(Debug, Error)]
pub enum LoaderError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("program {0}: {1}")]
    Program(&'static str, #[source] ProgramError),
    #[error("map {0}: {1}")]
    Map(&'static str, #[source] MapError),
    #[error("the eBPF object has no {0} {1}")]
    Missing(&'static str, &'static str),
    #[error("opening cgroup {path}: {source}")]
    Cgroup {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("mounting bpffs at {0}: {1}")]
    Bpffs(String, #[source] io::Error),
    #[error("programs are already attached")]
    AlreadyAttached,
    /// A hash map has no room for another key (E2BIG).
    #[error("map {0} is full")]
    Full(&'static str),
    #[error(transparent)]
    Pin(#[from] PinError),
    #[error(transparent)]
    UnixHook(#[from] UnixHookError),
    #[error("reading the kernel's BTF for the packet-socket guard: {0}")]
    SocketGuard(#[from] btf::BtfError),
    #[error("pinning {0}: {1}")]
    PinLink(String, String),
    #[error("{0}")]
    Other(String),
}

/// Sums of the per-CPU counters (also the `counters` of `agentwall status`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    pub allowed: u64,
    pub denied: u64,
    pub audited: u64,
    pub lost: u64,
    pub errors: u64,
}

impl Counters {
    /// Agent decisions made (each produced an event or a lost count).
    pub fn decisions(&self) -> u64 {
        self.allowed + self.denied + self.audited
    }
}

/// The prefixes a compiled policy wrote, without their rule sets (what removal needs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefixKeys {
    pub v4: Vec<(u8, [u8; 4])>,
    pub v6: Vec<(u8, [u8; 16])>,
    /// Unix entries: bits of the path matched, and the path.
    pub unix: Vec<(u32, [u8; UNIX_PATH_MAX])>,
}

impl PrefixKeys {
    pub fn of(c: &CompiledPolicy) -> Self {
        Self {
            v4: c.v4.iter().map(|(l, a, _)| (*l, *a)).collect(),
            v6: c.v6.iter().map(|(l, a, _)| (*l, *a)).collect(),
            unix: c.unix.iter().map(|(l, p, _)| (*l, *p)).collect(),
        }
    }
}

/// A prefix of one agent's grant trie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GrantPrefix {
    V4(u8, [u8; 4]),
    V6(u8, [u8; 16]),
}

/// How to load.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Bytes pending in the ring before a wake-up; `DEFAULT_WAKEUP_BYTES` when 0.
    pub wakeup_bytes: u64,
    /// Event ring size override (a power of two, page multiple).
    pub ring_bytes: Option<u32>,
    /// Pin maps and links here so enforcement outlives the controller, and adopt what is
    /// already pinned there. None: nothing pinned, programs detach when the Enforcer drops.
    pub pin_dir: Option<PathBuf>,
    /// Agent map size override (tests of a full map); `MAX_AGENTS` when None.
    pub agent_map_entries: Option<u32>,
}

pub struct Enforcer {
    ebpf: Ebpf,
    attached: bool,
    pin_dir: Option<PathBuf>,
    /// Programs were already pinned and attached by an earlier controller.
    adopted: bool,
    config: Array<MapData, Config>,
    /// What this controller last wrote to `config`.
    config_value: Config,
    agents: HashMap<MapData, u64, AgentEntry>,
    rules_v4: LpmTrie<MapData, PrefixV4, RuleSet>,
    rules_v6: LpmTrie<MapData, PrefixV6, RuleSet>,
    unix_paths: LpmTrie<MapData, UnixKey, UnixRule>,
    grants_v4: LpmTrie<MapData, GrantKeyV4, GrantSet>,
    grants_v6: LpmTrie<MapData, GrantKeyV6, GrantSet>,
    /// Agent cgroup id -> its rate limiter's state (written by the programs).
    rate: HashMap<MapData, u64, u64>,
    counters: PerCpuArray<MapData, u64>,
    events: Option<RingBuf<MapData>>,
    /// The Unix-socket programs (empty on a kernel without those hooks).
    unix_programs: Vec<UnixProgram>,
    /// Their links, held so they stay attached while this Enforcer lives (pinned too, when
    /// pinning).
    unix_links: Vec<std::os::fd::OwnedFd>,
    /// The packet-socket guard is loaded (this architecture and kernel have what it needs).
    socket_guard: bool,
    /// The dead-man stamp (AW_HEARTBEAT), while no `Heartbeat` has been handed out.
    heartbeat: Heartbeat,
    /// A second handle to it, for `take_heartbeat` (once).
    heartbeat_spare: Option<Heartbeat>,
    /// tgid -> executable (AW_EXES), written by the exec tracker; seeded from /proc at attach.
    exes: HashMap<MapData, u32, ExePath>,
    /// The exec tracker is loaded (this kernel's BTF has what it reads).
    exec_tracking: bool,
    /// Where agents' DNS is steered (AW_DNS_CONFIG).
    dns_config: Array<MapData, DnsConfig>,
    /// Steered DNS sockets (AW_DNS_SOCKS), written by the programs; the proxy reads them through
    /// its own handle (`dns_socks`).
    dns_socks: HashMap<MapData, u64, DnsSock>,
}

/// A read handle to the steered DNS sockets (AW_DNS_SOCKS), for the DNS proxy: who asked, from
/// the kernel. The proxy's own, so a lookup never waits for the control actor.
pub struct DnsSocks {
    map: HashMap<MapData, u64, DnsSock>,
}

impl DnsSocks {
    /// The agent and resolver of the steered socket with this cookie.
    pub fn get(&self, cookie: u64) -> Option<DnsSock> {
        self.map.get(&cookie, 0).ok()
    }
}

/// Signals liveness to the dead-man switches with its own handle to the heartbeat map, so a
/// task of its own can beat while the control actor is busy: the kernel compares the stamp with
/// its own clock, so agents fall back even when the controller is gone for good.
pub struct Heartbeat {
    map: Array<MapData, u64>,
}

impl Heartbeat {
    /// Stamps CLOCK_BOOTTIME now.
    pub fn beat(&mut self) -> Result<(), LoaderError> {
        self.map
            .set(0, boottime_ns(), 0)
            .map_err(|e| LoaderError::Map(names::HEARTBEAT_MAP, e))
    }

    /// A second handle to the same map (a duplicated descriptor).
    fn try_clone(&self) -> Result<Heartbeat, LoaderError> {
        use aya::maps::IterableMap;
        let fd = self
            .map
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| LoaderError::Other(format!("duplicating the heartbeat map fd: {e}")))?;
        let data = MapData::from_fd(fd).map_err(|e| LoaderError::Map(names::HEARTBEAT_MAP, e))?;
        let map = Array::try_from(aya::maps::Map::Array(data))
            .map_err(|e| LoaderError::Map(names::HEARTBEAT_MAP, e))?;
        Ok(Heartbeat { map })
    }
}

impl Beat for Heartbeat {
    fn beat(&mut self) -> Result<(), LoaderError> {
        Heartbeat::beat(self)
    }
}

macro_rules! take_map {
    ($ebpf:expr, $name:expr) => {
        $ebpf
            .take_map($name)
            .ok_or(LoaderError::Missing("map", $name))?
            .try_into()
            .map_err(|e| LoaderError::Map($name, e))?
    };
}

impl Enforcer {
    /// Loads the object and its programs into the kernel; nothing is attached yet, so
    /// the maps can be filled first and enforcement starts complete.
    /// With a pin directory, maps already pinned there are checked and reused (their contents
    /// are what enforces right now), and missing ones are created and pinned.
    pub fn load(opts: &LoadOptions) -> Result<Self, LoaderError> {
        let wakeup_bytes = match opts.wakeup_bytes {
            0 => DEFAULT_WAKEUP_BYTES,
            n => n,
        };
        let unix_offsets = unix_hooks::kernel_context_offsets()?;
        let mut loader = EbpfLoader::new();
        loader.override_global("WAKEUP_BYTES", &wakeup_bytes, true);
        match &unix_offsets {
            Some((uaddr, uaddrlen)) => {
                loader.override_global("KCTX_UADDR_OFFSET", uaddr, true);
                loader.override_global("KCTX_UADDRLEN_OFFSET", uaddrlen, true);
            }
            None => tracing::warn!(
                "this kernel has no Unix-socket hooks (Linux 6.7+): agents' Unix-socket \
                 connections are not judged"
            ),
        }
        let guard_layout = socket_guard::kernel_layout()?;
        let btf = Btf::from_sys_fs()
            .map_err(|e| LoaderError::Other(format!("reading the kernel's BTF: {e}")))?;
        let has_tracepoint = btf
            .id_by_type_name_kind(
                &format!("btf_trace_{}", names::NET_RAW_TRACEPOINT),
                aya_obj::btf::BtfKind::Typedef,
            )
            .is_ok();
        let socket_guard = guard_layout.enabled != 0 && has_tracepoint;
        if !socket_guard {
            tracing::warn!(
                "the packet-socket guard needs x86-64 and the cap_capable tracepoint (Linux \
                 6.13+): agents' packet sockets are not judged here (`exec` still drops \
                 CAP_NET_RAW)"
            );
        }
        loader.override_global("CAP_GUARD_LAYOUT", &guard_layout, true);
        let proc_layout = exec_track::kernel_layout()?;
        let exec_tracking = names::EXEC_PROGRAMS.iter().all(|(_, tp)| {
            btf.id_by_type_name_kind(&format!("btf_trace_{tp}"), aya_obj::btf::BtfKind::Typedef)
                .is_ok()
        });
        if !exec_tracking {
            tracing::warn!(
                "this kernel lacks the sched_process_{{exec,fork,exit}} tracepoints: records \
                 name executables from /proc only (marked `exe_source: procfs`)"
            );
        }
        loader.override_global("PROC_LAYOUT", &proc_layout, true);
        if let Some(bytes) = opts.ring_bytes {
            loader.map_max_entries(names::EVENTS_MAP, bytes);
        }
        if let Some(n) = opts.agent_map_entries {
            loader.map_max_entries(names::AGENTS_MAP, n);
        }
        let specs = pin::expected_maps(opts.ring_bytes);
        let mut adopted = false;
        if let Some(dir) = &opts.pin_dir {
            pin::check_maps(dir, opts.ring_bytes)?;
            for sub in ["maps", "links"] {
                std::fs::create_dir_all(dir.join(sub)).map_err(|source| PinError::Io {
                    path: dir.join(sub),
                    source,
                })?;
            }
            for spec in &specs {
                loader.map_pin_path(spec.name, dir.join("maps").join(spec.name));
            }
            adopted = pin::links_exist(dir, &names::CGROUP_PROGRAMS)
                && (unix_offsets.is_none() || pin::links_exist(dir, &names::UNIX_PROGRAMS))
                && (!socket_guard || pin::links_exist(dir, &[names::NET_RAW_PROGRAM]))
                && (!exec_tracking || pin::links_exist(dir, &names::EXEC_PROGRAMS.map(|(n, _)| n)));
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        let unix_programs = match unix_offsets {
            Some(_) => unix_hooks::load(EBPF_OBJECT, &ebpf)?,
            None => Vec::new(),
        };
        for name in names::SOCK_ADDR_PROGRAMS {
            sock_addr_program(&mut ebpf, name)?
                .load()
                .map_err(|e| LoaderError::Program(name, e))?;
        }
        sock_program(&mut ebpf)?
            .load()
            .map_err(|e| LoaderError::Program(names::SOCK_CREATE_PROGRAM, e))?;
        if socket_guard {
            guard_program(&mut ebpf)?
                .load(names::NET_RAW_TRACEPOINT, &btf)
                .map_err(|e| LoaderError::Program(names::NET_RAW_PROGRAM, e))?;
        }
        if exec_tracking {
            for (name, tp) in names::EXEC_PROGRAMS {
                tracing_program(&mut ebpf, name)?
                    .load(tp, &btf)
                    .map_err(|e| LoaderError::Program(name, e))?;
            }
        }

        let config: Array<MapData, Config> = take_map!(ebpf, names::CONFIG_MAP);
        let agents = take_map!(ebpf, names::AGENTS_MAP);
        let rules_v4 = take_map!(ebpf, names::RULES_V4_MAP);
        let rules_v6 = take_map!(ebpf, names::RULES_V6_MAP);
        let unix_paths = take_map!(ebpf, names::UNIX_MAP);
        let grants_v4 = take_map!(ebpf, names::GRANTS_V4_MAP);
        let grants_v6 = take_map!(ebpf, names::GRANTS_V6_MAP);
        let rate = take_map!(ebpf, names::RATE_MAP);
        let counters = take_map!(ebpf, names::COUNTERS_MAP);
        let events = Some(take_map!(ebpf, names::EVENTS_MAP));
        let exes = take_map!(ebpf, names::EXES_MAP);
        let dns_config = take_map!(ebpf, names::DNS_CONFIG_MAP);
        let dns_socks = take_map!(ebpf, names::DNS_SOCKS_MAP);
        let mut heartbeat = Heartbeat {
            map: take_map!(ebpf, names::HEARTBEAT_MAP),
        };
        heartbeat.beat()?;
        let heartbeat_spare = Some(heartbeat.try_clone()?);
        // An adopted config keeps its agent levels until the controller has re-registered.
        let config_value = config.get(&0, 0).unwrap_or_default();
        Ok(Self {
            ebpf,
            attached: false,
            config_value,
            pin_dir: opts.pin_dir.clone(),
            adopted,
            config,
            agents,
            rules_v4,
            rules_v6,
            unix_paths,
            grants_v4,
            grants_v6,
            rate,
            counters,
            events,
            unix_programs,
            unix_links: Vec::new(),
            socket_guard,
            heartbeat,
            heartbeat_spare,
            exes,
            exec_tracking,
            dns_config,
            dns_socks,
        })
    }

    /// Steers agents' DNS to the proxy at these addresses (None: no steering; port-53 traffic
    /// is judged by the policy like any other).
    pub fn set_dns(
        &mut self,
        to: Option<(SocketAddrV4, Option<SocketAddrV6>)>,
    ) -> Result<(), LoaderError> {
        let value = match to {
            None => DnsConfig::default(),
            Some((v4, v6)) => DnsConfig {
                enabled: 1,
                port: u32::from(v4.port().to_be()),
                ip4: u32::from_ne_bytes(v4.ip().octets()),
                has_ip6: u32::from(v6.is_some()),
                ip6: v6.map_or([0; 4], |a| {
                    let o = a.ip().octets();
                    [0, 4, 8, 12].map(|i| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]))
                }),
            },
        };
        if let Some((v4, Some(v6))) = to {
            if v4.port() != v6.port() {
                return Err(LoaderError::Other(format!(
                    "the DNS proxy listens on one port for both families ({v4} and {v6} differ)"
                )));
            }
        }
        self.dns_config
            .set(0, value, 0)
            .map_err(|e| LoaderError::Map(names::DNS_CONFIG_MAP, e))
    }

    /// A handle of its own to the steered DNS sockets, for the proxy.
    pub fn dns_socks(&self) -> Result<DnsSocks, LoaderError> {
        use aya::maps::IterableMap;
        let fd = self
            .dns_socks
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| LoaderError::Other(format!("duplicating the DNS socket map fd: {e}")))?;
        let data = MapData::from_fd(fd).map_err(|e| LoaderError::Map(names::DNS_SOCKS_MAP, e))?;
        let map = HashMap::try_from(aya::maps::Map::LruHashMap(data))
            .map_err(|e| LoaderError::Map(names::DNS_SOCKS_MAP, e))?;
        Ok(DnsSocks { map })
    }

    /// Attaches every program to `cgroup` (the cgroup2 root in production) with bpf links,
    /// which coexist with other programs on the node. Unpinned, dropping the Enforcer detaches
    /// them; pinned, they stay. A link already pinned for a program, by an earlier controller in
    /// this directory or in an `older` layout's, is switched to this object's program in one
    /// step (BPF_LINK_UPDATE) and pinned here: restart, upgrade and layout migration alike, and
    /// no call is ever judged by neither program nor by both.
    pub fn attach(&mut self, cgroup: &Path, older: &[PathBuf]) -> Result<(), LoaderError> {
        if self.attached {
            return Err(LoaderError::AlreadyAttached);
        }
        let fd = File::open(cgroup).map_err(|source| LoaderError::Cgroup {
            path: cgroup.display().to_string(),
            source,
        })?;
        let unix: Vec<&'static str> = self.unix_programs.iter().map(|p| p.name).collect();
        for name in names::CGROUP_PROGRAMS.into_iter().chain(unix) {
            if let Some(dir) = self.pin_dir.clone() {
                let own = dir.join("links").join(name);
                let prior = std::iter::once(own.clone())
                    .chain(older.iter().rev().map(|d| d.join("links").join(name)))
                    .find(|p| p.exists());
                if let Some(prior) = prior {
                    pin::link_update(&prior, self.program_fd(name)?)?;
                    if prior != own {
                        pin::repin(&prior, &own)?;
                    }
                    continue;
                }
            }
            self.attach_new(name, &fd)?;
        }
        if self.socket_guard {
            self.attach_tracing(names::NET_RAW_PROGRAM)?;
        }
        if self.exec_tracking {
            for (name, _) in names::EXEC_PROGRAMS {
                self.attach_tracing(name)?;
            }
            // Processes that exec'd before the tracker ran: from /proc, never over what the
            // programs have written since.
            match exec_track::seed_from_proc(&mut self.exes) {
                Ok(n) => tracing::debug!(processes = n, "executables seeded from /proc"),
                Err(e) => tracing::warn!("seeding executables from /proc: {e}"),
            }
        }
        self.attached = true;
        Ok(())
    }

    /// Attaches a tracing program (the packet-socket guard, the exec tracker) to its
    /// tracepoint. A tracing link cannot switch programs (no BPF_LINK_UPDATE), so a pinned one
    /// is replaced the other way round: the new link is attached first and its pin renamed over
    /// the old one, which detaches the old program. For that moment both run; never neither.
    fn attach_tracing(&mut self, name: &'static str) -> Result<(), LoaderError> {
        let prog = tracing_program(&mut self.ebpf, name)?;
        let id = prog.attach().map_err(|e| LoaderError::Program(name, e))?;
        let Some(dir) = &self.pin_dir else {
            // Unpinned: aya keeps the link, and dropping the Enforcer detaches it.
            return Ok(());
        };
        let link = prog
            .take_link(id)
            .map_err(|e| LoaderError::Program(name, e))?;
        let link = FdLink::from(link);
        let own = dir.join("links").join(name);
        // bpffs refuses names with a dot.
        let fresh = dir.join("links").join(format!("{name}_new"));
        let _ = std::fs::remove_file(&fresh);
        let pin_err = |e: String| LoaderError::PinLink(fresh.display().to_string(), e);
        let with_source = |e: aya::pin::PinError| match std::error::Error::source(&e) {
            Some(s) => format!("{e}: {s}"),
            None => e.to_string(),
        };
        link.pin(&fresh)
            .map(drop)
            .map_err(|e| pin_err(with_source(e)))?;
        std::fs::rename(&fresh, &own).map_err(|e| pin_err(e.to_string()))
    }

    /// The loaded program called `name`.
    fn program_fd(&self, name: &'static str) -> Result<std::os::fd::BorrowedFd<'_>, LoaderError> {
        if let Some(p) = self.unix_programs.iter().find(|p| p.name == name) {
            return Ok(p.fd.as_fd());
        }
        let prog = self
            .ebpf
            .program(name)
            .ok_or(LoaderError::Missing("program", name))?;
        let fd = match prog {
            aya::programs::Program::CgroupSockAddr(p) => p.fd(),
            aya::programs::Program::CgroupSock(p) => p.fd(),
            _ => return Err(LoaderError::Missing("cgroup program", name)),
        };
        Ok(fd.map_err(|e| LoaderError::Program(name, e))?.as_fd())
    }

    /// Attaches `name` to the cgroup with a new link, pinned when pinning.
    fn attach_new(&mut self, name: &'static str, cgroup: &File) -> Result<(), LoaderError> {
        let pin_path = self.pin_dir.as_ref().map(|d| d.join("links").join(name));
        let pin_err = |path: &Path, e: String| LoaderError::PinLink(path.display().to_string(), e);
        if let Some(prog) = self.unix_programs.iter().find(|p| p.name == name) {
            let link = prog.attach(cgroup)?;
            if let Some(path) = &pin_path {
                sys::obj_pin(&link, path).map_err(|e| pin_err(path, e.to_string()))?;
            }
            self.unix_links.push(link);
            return Ok(());
        }
        // aya's two cgroup program types share no attach trait: the same steps for each.
        // aya 0.14: any mode but Single fails with EINVAL for links; links are multi-attach.
        macro_rules! attach_and_take {
            ($prog:expr) => {{
                let prog = $prog;
                let id = prog
                    .attach(cgroup, CgroupAttachMode::Single)
                    .map_err(|e| LoaderError::Program(name, e))?;
                if pin_path.is_none() {
                    // Unpinned: aya keeps the link, and dropping the Enforcer detaches it.
                    return Ok(());
                }
                let link = prog
                    .take_link(id)
                    .map_err(|e| LoaderError::Program(name, e))?;
                FdLink::try_from(link).map_err(|e| pin_err(Path::new(name), e.to_string()))?
            }};
        }
        let link: FdLink = if name == names::SOCK_CREATE_PROGRAM {
            attach_and_take!(sock_program(&mut self.ebpf)?)
        } else {
            attach_and_take!(sock_addr_program(&mut self.ebpf, name)?)
        };
        if let Some(path) = &pin_path {
            link.pin(path)
                .map(drop)
                .map_err(|e| pin_err(path, e.to_string()))?;
        }
        Ok(())
    }

    /// Programs and maps were pinned by an earlier controller and are being adopted.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Whether enforcement outlives this Enforcer.
    pub fn pinned(&self) -> bool {
        self.pin_dir.is_some()
    }

    /// Agent entries in the map (an adopted map holds the previous controller's).
    pub fn agent_entries(&self) -> Vec<(u64, AgentEntry)> {
        self.agents.iter().filter_map(Result::ok).collect()
    }

    /// Policy ids that have prefixes in the tries.
    pub fn rule_policy_ids(&self) -> BTreeSet<u32> {
        policy_ids(&self.rules_v4)
            .chain(policy_ids(&self.rules_v6))
            .chain(policy_ids(&self.unix_paths))
            .collect()
    }

    /// Whether agents' Unix-socket connections are judged (the kernel has the hooks).
    pub fn unix_hooks(&self) -> bool {
        !self.unix_programs.is_empty()
    }

    /// Removes every prefix whose policy id is not in `keep` (left by an earlier controller).
    pub fn remove_rules_except(&mut self, keep: &BTreeSet<u32>) -> Result<usize, LoaderError> {
        Ok(remove_stale(&mut self.rules_v4, keep, names::RULES_V4_MAP)?
            + remove_stale(&mut self.rules_v6, keep, names::RULES_V6_MAP)?
            + remove_stale(&mut self.unix_paths, keep, names::UNIX_MAP)?)
    }

    /// Lost events already reported (kept in the pinned counters across restarts).
    pub fn lost_reported(&self) -> Result<u64, LoaderError> {
        let v = self
            .counters
            .get(&counter::LOST_REPORTED, 0)
            .map_err(|e| LoaderError::Map(names::COUNTERS_MAP, e))?;
        Ok(v.first().copied().unwrap_or(0))
    }

    pub fn set_lost_reported(&mut self, n: u64) -> Result<(), LoaderError> {
        let cpus =
            aya::util::nr_cpus().map_err(|(what, e)| LoaderError::Other(format!("{what}: {e}")))?;
        let mut values = vec![0u64; cpus];
        values[0] = n;
        let values = PerCpuValues::try_from(values)
            .map_err(|e| LoaderError::Other(format!("per-CPU values: {e}")))?;
        self.counters
            .set(counter::LOST_REPORTED, values, 0)
            .map_err(|e| LoaderError::Map(names::COUNTERS_MAP, e))
    }

    /// Hands the ring buffer to the event reader (once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Sets the mask of cgroup levels that hold entries.
    pub fn set_agent_levels(&mut self, mask: u32) -> Result<(), LoaderError> {
        self.config_value.agent_levels = mask;
        self.write_config()
    }

    /// Cgroup levels the programs currently look at for entries.
    pub fn agent_levels(&self) -> u32 {
        self.config_value.agent_levels
    }

    /// Signals liveness to the dead-man switches (the same map a `Heartbeat` writes).
    pub fn heartbeat(&mut self) -> Result<(), LoaderError> {
        self.heartbeat.beat()
    }

    /// A handle of its own to the heartbeat map, for a task that beats without the control
    /// actor (once; `None` after).
    pub fn take_heartbeat(&mut self) -> Option<Heartbeat> {
        self.heartbeat_spare.take()
    }

    /// Whether the exec tracker runs (records carry the executable the kernel saw).
    pub fn exec_tracking(&self) -> bool {
        self.exec_tracking
    }

    fn write_config(&mut self) -> Result<(), LoaderError> {
        self.config
            .set(0, self.config_value, 0)
            .map_err(|e| LoaderError::Map(names::CONFIG_MAP, e))
    }

    pub fn set_agent(&mut self, cgroup_id: u64, entry: AgentEntry) -> Result<(), LoaderError> {
        self.agents
            .insert(cgroup_id, entry, 0)
            .map_err(|e| match &e {
                MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG) => {
                    LoaderError::Full(names::AGENTS_MAP)
                }
                _ => LoaderError::Map(names::AGENTS_MAP, e),
            })
    }

    /// How many entries the agent map holds at most.
    pub fn agent_capacity(&self) -> u32 {
        self.agents
            .map()
            .info()
            .map(|i| i.max_entries())
            .unwrap_or(agent_common::MAX_AGENTS)
    }

    /// Reads back from the kernel which links are pinned and attached.
    pub fn kernel_state(&self) -> kernel_state::KernelState {
        let mut programs: Vec<&'static str> = names::CGROUP_PROGRAMS.to_vec();
        programs.extend(self.unix_programs.iter().map(|p| p.name));
        if self.socket_guard {
            programs.push(names::NET_RAW_PROGRAM);
        }
        if self.exec_tracking {
            programs.extend(names::EXEC_PROGRAMS.map(|(n, _)| n));
        }
        let links = programs
            .into_iter()
            .map(|program| match &self.pin_dir {
                Some(dir) => {
                    let path = dir.join("links").join(program);
                    let pinned = path.exists();
                    let attached =
                        pinned && kernel_state::pinned_link_attached(&path).unwrap_or(false);
                    kernel_state::LinkState {
                        program,
                        pinned,
                        attached,
                    }
                }
                // Unpinned links are held by this process: attached while it lives.
                None => kernel_state::LinkState {
                    program,
                    pinned: false,
                    attached: self.attached,
                },
            })
            .collect();
        kernel_state::KernelState {
            pinned: self.pin_dir.is_some(),
            links,
        }
    }

    pub fn remove_agent(&mut self, cgroup_id: u64) -> Result<(), LoaderError> {
        match self.agents.remove(&cgroup_id) {
            Err(e) if !is_absent(&e) => return Err(LoaderError::Map(names::AGENTS_MAP, e)),
            _ => {}
        }
        // Its rate limiter goes with it (a cgroup id is never reused while the node runs); an
        // agent that never made a call has none.
        match self.rate.remove(&cgroup_id) {
            Err(e) if !is_absent(&e) => Err(LoaderError::Map(names::RATE_MAP, e)),
            _ => Ok(()),
        }
    }

    /// The rate limiter's state of agent `cgroup_id` (`decide::rate_take`'s `tat`), 0 if none.
    pub fn rate_state(&self, cgroup_id: u64) -> Result<u64, LoaderError> {
        match self.rate.get(&cgroup_id, 0) {
            Ok(v) => Ok(v),
            Err(MapError::KeyNotFound) => Ok(0),
            Err(e) => Err(LoaderError::Map(names::RATE_MAP, e)),
        }
    }

    /// Writes a compiled policy's prefixes under `policy_id`.
    pub fn install_rules(
        &mut self,
        policy_id: u32,
        compiled: &CompiledPolicy,
    ) -> Result<(), LoaderError> {
        for (len, addr, rules) in &compiled.v4 {
            self.rules_v4
                .insert(&key_v4(policy_id, *len, *addr), rules, 0)
                .map_err(|e| LoaderError::Map(names::RULES_V4_MAP, e))?;
        }
        for (len, addr, rules) in &compiled.v6 {
            self.rules_v6
                .insert(&key_v6(policy_id, *len, *addr), rules, 0)
                .map_err(|e| LoaderError::Map(names::RULES_V6_MAP, e))?;
        }
        for (bits, path, rule_id) in &compiled.unix {
            self.unix_paths
                .insert(
                    &key_unix(policy_id, *bits, *path),
                    UnixRule { rule_id: *rule_id },
                    0,
                )
                .map_err(|e| LoaderError::Map(names::UNIX_MAP, e))?;
        }
        Ok(())
    }

    /// Removes what `install_rules` wrote for `policy_id`.
    pub fn remove_rules(&mut self, policy_id: u32, keys: &PrefixKeys) -> Result<(), LoaderError> {
        for (len, addr) in &keys.v4 {
            remove_key(
                &mut self.rules_v4,
                &key_v4(policy_id, *len, *addr),
                names::RULES_V4_MAP,
            )?;
        }
        for (len, addr) in &keys.v6 {
            remove_key(
                &mut self.rules_v6,
                &key_v6(policy_id, *len, *addr),
                names::RULES_V6_MAP,
            )?;
        }
        for (bits, path) in &keys.unix {
            remove_key(
                &mut self.unix_paths,
                &key_unix(policy_id, *bits, *path),
                names::UNIX_MAP,
            )?;
        }
        Ok(())
    }

    /// Writes the grants of `agent` covering `prefix` (the union the controller computed).
    pub fn set_grants(
        &mut self,
        agent: u64,
        prefix: GrantPrefix,
        set: &GrantSet,
    ) -> Result<(), LoaderError> {
        let full = |name: &'static str| {
            move |e: MapError| match &e {
                MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOSPC) => {
                    LoaderError::Full(name)
                }
                _ => LoaderError::Map(name, e),
            }
        };
        match prefix {
            GrantPrefix::V4(len, addr) => self
                .grants_v4
                .insert(&grant_key_v4(agent, len, addr), set, 0)
                .map_err(full(names::GRANTS_V4_MAP)),
            GrantPrefix::V6(len, addr) => self
                .grants_v6
                .insert(&grant_key_v6(agent, len, addr), set, 0)
                .map_err(full(names::GRANTS_V6_MAP)),
        }
    }

    /// Removes one prefix of `agent`'s grants (gone already is fine).
    pub fn remove_grants(&mut self, agent: u64, prefix: GrantPrefix) -> Result<(), LoaderError> {
        match prefix {
            GrantPrefix::V4(len, addr) => remove_key(
                &mut self.grants_v4,
                &grant_key_v4(agent, len, addr),
                names::GRANTS_V4_MAP,
            ),
            GrantPrefix::V6(len, addr) => remove_key(
                &mut self.grants_v6,
                &grant_key_v6(agent, len, addr),
                names::GRANTS_V6_MAP,
            ),
        }
    }

    /// Every grant-trie entry: (agent, prefix, grants), as an adopted map holds them.
    pub fn grant_entries(&self) -> Vec<(u64, GrantPrefix, GrantSet)> {
        let mut out = Vec::new();
        for k in self.grants_v4.keys().filter_map(Result::ok) {
            if let Ok(v) = self.grants_v4.get(&k, 0) {
                let len = (k.prefix_len() - GRANT_AGENT_BITS) as u8;
                let d = k.data();
                out.push((u64::from_be_bytes(d.agent), GrantPrefix::V4(len, d.addr), v));
            }
        }
        for k in self.grants_v6.keys().filter_map(Result::ok) {
            if let Ok(v) = self.grants_v6.get(&k, 0) {
                let len = (k.prefix_len() - GRANT_AGENT_BITS) as u8;
                let d = k.data();
                out.push((u64::from_be_bytes(d.agent), GrantPrefix::V6(len, d.addr), v));
            }
        }
        out
    }

    pub fn counters(&self) -> Result<Counters, LoaderError> {
        let sum = |i: u32| -> Result<u64, LoaderError> {
            let v = self
                .counters
                .get(&i, 0)
                .map_err(|e| LoaderError::Map(names::COUNTERS_MAP, e))?;
            Ok(v.iter().sum())
        };
        Ok(Counters {
            allowed: sum(counter::ALLOWED)?,
            denied: sum(counter::DENIED)?,
            audited: sum(counter::AUDITED)?,
            lost: sum(counter::LOST)?,
            errors: sum(counter::ERRORS)?,
        })
    }
}

/// The liveness stamp of the dead-man switches, written from its own task.
pub trait Beat: Send + 'static {
    fn beat(&mut self) -> Result<(), LoaderError>;
}

/// What the control actor needs from the datapath: the agent map, the rule tries, the counters
/// and the kernel's own view of what is attached. `Enforcer` is the real one; `fake::Fake`
/// keeps it in memory for unit tests of control logic.
pub trait Datapath: Send + 'static {
    fn set_agent(&mut self, cgroup_id: u64, entry: AgentEntry) -> Result<(), LoaderError>;
    fn remove_agent(&mut self, cgroup_id: u64) -> Result<(), LoaderError>;
    /// Every entry of the agent map (an adopted map holds the previous controller's).
    fn agent_entries(&self) -> Vec<(u64, AgentEntry)>;
    fn agent_capacity(&self) -> u32;
    fn set_agent_levels(&mut self, mask: u32) -> Result<(), LoaderError>;
    fn install_rules(
        &mut self,
        policy_id: u32,
        compiled: &CompiledPolicy,
    ) -> Result<(), LoaderError>;
    fn remove_rules(&mut self, policy_id: u32, keys: &PrefixKeys) -> Result<(), LoaderError>;
    fn remove_rules_except(&mut self, keep: &BTreeSet<u32>) -> Result<usize, LoaderError>;
    fn rule_policy_ids(&self) -> BTreeSet<u32>;
    fn counters(&self) -> Result<Counters, LoaderError>;
    fn lost_reported(&self) -> Result<u64, LoaderError>;
    fn set_lost_reported(&mut self, n: u64) -> Result<(), LoaderError>;
    /// One liveness stamp, from the actor (used while no `Beat` of its own exists).
    fn heartbeat(&mut self) -> Result<(), LoaderError>;
    /// A handle that stamps liveness from its own task, so a busy actor never starves it.
    fn take_heartbeat(&mut self) -> Option<Box<dyn Beat>>;
    fn pinned(&self) -> bool;
    fn kernel_state(&self) -> kernel_state::KernelState;
    /// The grant tries (see `Enforcer::set_grants`).
    fn set_grants(
        &mut self,
        agent: u64,
        prefix: GrantPrefix,
        set: &GrantSet,
    ) -> Result<(), LoaderError>;
    fn remove_grants(&mut self, agent: u64, prefix: GrantPrefix) -> Result<(), LoaderError>;
    fn grant_entries(&self) -> Vec<(u64, GrantPrefix, GrantSet)>;
    /// The pin directory, where the controller keeps its runtime state beside the maps.
    fn pin_dir(&self) -> Option<PathBuf>;
    /// Read-only, for `explain`: the lookups the kernel programs make, with their keys (a
    /// full-length key, so the trie answers with the longest prefix covering the address).
    fn lookup_rules(&self, policy_id: u32, addr: IpAddr) -> Result<Option<RuleSet>, LoaderError>;
    fn lookup_grants(&self, agent: u64, addr: IpAddr) -> Result<Option<GrantSet>, LoaderError>;
    /// The dead-man stamp (CLOCK_BOOTTIME ns) the kernel compares its clock with.
    fn last_heartbeat_ns(&self) -> Result<u64, LoaderError>;
    /// An agent's rate limiter state (see `Enforcer::rate_state`).
    fn rate_state(&self, cgroup_id: u64) -> Result<u64, LoaderError>;
}

impl Datapath for Enforcer {
    fn lookup_rules(&self, policy_id: u32, addr: IpAddr) -> Result<Option<RuleSet>, LoaderError> {
        let found = match addr {
            IpAddr::V4(a) => self.rules_v4.get(&key_v4(policy_id, 32, a.octets()), 0),
            IpAddr::V6(a) => self.rules_v6.get(&key_v6(policy_id, 128, a.octets()), 0),
        };
        absent_is_none(found, names::RULES_V4_MAP)
    }
    fn lookup_grants(&self, agent: u64, addr: IpAddr) -> Result<Option<GrantSet>, LoaderError> {
        let found = match addr {
            IpAddr::V4(a) => self.grants_v4.get(&grant_key_v4(agent, 32, a.octets()), 0),
            IpAddr::V6(a) => self.grants_v6.get(&grant_key_v6(agent, 128, a.octets()), 0),
        };
        absent_is_none(found, names::GRANTS_V4_MAP)
    }
    fn last_heartbeat_ns(&self) -> Result<u64, LoaderError> {
        self.heartbeat
            .map
            .get(&0, 0)
            .map_err(|e| LoaderError::Map(names::HEARTBEAT_MAP, e))
    }
    fn set_agent(&mut self, cgroup_id: u64, entry: AgentEntry) -> Result<(), LoaderError> {
        Enforcer::set_agent(self, cgroup_id, entry)
    }
    fn remove_agent(&mut self, cgroup_id: u64) -> Result<(), LoaderError> {
        Enforcer::remove_agent(self, cgroup_id)
    }
    fn agent_entries(&self) -> Vec<(u64, AgentEntry)> {
        Enforcer::agent_entries(self)
    }
    fn agent_capacity(&self) -> u32 {
        Enforcer::agent_capacity(self)
    }
    fn set_agent_levels(&mut self, mask: u32) -> Result<(), LoaderError> {
        Enforcer::set_agent_levels(self, mask)
    }
    fn rate_state(&self, cgroup_id: u64) -> Result<u64, LoaderError> {
        Enforcer::rate_state(self, cgroup_id)
    }
    fn install_rules(
        &mut self,
        policy_id: u32,
        compiled: &CompiledPolicy,
    ) -> Result<(), LoaderError> {
        Enforcer::install_rules(self, policy_id, compiled)
    }
    fn remove_rules(&mut self, policy_id: u32, keys: &PrefixKeys) -> Result<(), LoaderError> {
        Enforcer::remove_rules(self, policy_id, keys)
    }
    fn remove_rules_except(&mut self, keep: &BTreeSet<u32>) -> Result<usize, LoaderError> {
        Enforcer::remove_rules_except(self, keep)
    }
    fn rule_policy_ids(&self) -> BTreeSet<u32> {
        Enforcer::rule_policy_ids(self)
    }
    fn counters(&self) -> Result<Counters, LoaderError> {
        Enforcer::counters(self)
    }
    fn lost_reported(&self) -> Result<u64, LoaderError> {
        Enforcer::lost_reported(self)
    }
    fn set_lost_reported(&mut self, n: u64) -> Result<(), LoaderError> {
        Enforcer::set_lost_reported(self, n)
    }
    fn heartbeat(&mut self) -> Result<(), LoaderError> {
        Enforcer::heartbeat(self)
    }
    fn take_heartbeat(&mut self) -> Option<Box<dyn Beat>> {
        Enforcer::take_heartbeat(self).map(|h| Box::new(h) as Box<dyn Beat>)
    }
    fn pinned(&self) -> bool {
        Enforcer::pinned(self)
    }
    fn kernel_state(&self) -> kernel_state::KernelState {
        Enforcer::kernel_state(self)
    }
    fn set_grants(
        &mut self,
        agent: u64,
        prefix: GrantPrefix,
        set: &GrantSet,
    ) -> Result<(), LoaderError> {
        Enforcer::set_grants(self, agent, prefix, set)
    }
    fn remove_grants(&mut self, agent: u64, prefix: GrantPrefix) -> Result<(), LoaderError> {
        Enforcer::remove_grants(self, agent, prefix)
    }
    fn grant_entries(&self) -> Vec<(u64, GrantPrefix, GrantSet)> {
        Enforcer::grant_entries(self)
    }
    fn pin_dir(&self) -> Option<PathBuf> {
        self.pin_dir.clone()
    }
}

/// What an older pinned layout leaves once its links are unpinned: its event ring, still to be
/// read, and the events it lost that its controller never reported. The counters' slots are the
/// same in every layout so far; the ring's records of v2 and v3 are shorter prefixes of v4's
/// (v4's and v5's are the same size: v5 names the former reserved word `task_slot`, 0 in v4),
/// which decoding widens (agent_common::Event::from_bytes).
pub struct Retired {
    pub dir: PathBuf,
    pub ring: Option<RingBuf<MapData>>,
    pub lost: u64,
}

impl Retired {
    pub fn open(dir: &Path) -> Result<Retired, LoaderError> {
        let maps = dir.join("maps");
        let path = maps.join(names::EVENTS_MAP);
        let ring = if path.exists() {
            let mut spec = pin::spec(names::EVENTS_MAP, None).expect("a ring spec");
            spec.max_entries = 0;
            pin::check_map(&path, &spec)?;
            let data =
                MapData::from_pin(&path).map_err(|e| LoaderError::Map(names::EVENTS_MAP, e))?;
            Some(
                RingBuf::try_from(aya::maps::Map::RingBuf(data))
                    .map_err(|e| LoaderError::Map(names::EVENTS_MAP, e))?,
            )
        } else {
            None
        };
        let path = maps.join(names::COUNTERS_MAP);
        let lost = if path.exists() {
            pin::check_map(
                &path,
                &pin::spec(names::COUNTERS_MAP, None).expect("a counters spec"),
            )?;
            let data =
                MapData::from_pin(&path).map_err(|e| LoaderError::Map(names::COUNTERS_MAP, e))?;
            let counters: PerCpuArray<MapData, u64> =
                PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
                    .map_err(|e| LoaderError::Map(names::COUNTERS_MAP, e))?;
            let get = |i: u32| {
                counters
                    .get(&i, 0)
                    .map_err(|e| LoaderError::Map(names::COUNTERS_MAP, e))
            };
            let lost: u64 = get(counter::LOST)?.iter().sum();
            let reported = get(counter::LOST_REPORTED)?.first().copied().unwrap_or(0);
            lost.saturating_sub(reported)
        } else {
            0
        };
        Ok(Retired {
            dir: dir.to_path_buf(),
            ring,
            lost,
        })
    }
}

/// CLOCK_BOOTTIME in ns, the clock of `bpf_ktime_get_boot_ns`.
pub fn boottime_ns() -> u64 {
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid clock id and out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn sock_addr_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, LoaderError> {
    ebpf.program_mut(name)
        .ok_or(LoaderError::Missing("program", name))?
        .try_into()
        .map_err(|e| LoaderError::Program(name, e))
}

fn guard_program(ebpf: &mut Ebpf) -> Result<&mut BtfTracePoint, LoaderError> {
    tracing_program(ebpf, names::NET_RAW_PROGRAM)
}

fn tracing_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut BtfTracePoint, LoaderError> {
    ebpf.program_mut(name)
        .ok_or(LoaderError::Missing("program", name))?
        .try_into()
        .map_err(|e| LoaderError::Program(name, e))
}

fn sock_program(ebpf: &mut Ebpf) -> Result<&mut CgroupSock, LoaderError> {
    ebpf.program_mut(names::SOCK_CREATE_PROGRAM)
        .ok_or(LoaderError::Missing("program", names::SOCK_CREATE_PROGRAM))?
        .try_into()
        .map_err(|e| LoaderError::Program(names::SOCK_CREATE_PROGRAM, e))
}

/// A trie key whose first 32 bits are the policy id.
trait PolicyKeyed: aya::Pod {
    fn policy_id(&self) -> u32;
}

impl PolicyKeyed for PrefixV4 {
    fn policy_id(&self) -> u32 {
        u32::from_be_bytes(self.policy)
    }
}

impl PolicyKeyed for PrefixV6 {
    fn policy_id(&self) -> u32 {
        u32::from_be_bytes(self.policy)
    }
}

impl PolicyKeyed for UnixKey {
    fn policy_id(&self) -> u32 {
        u32::from_be_bytes(self.policy)
    }
}

fn policy_ids<K: PolicyKeyed, V: aya::Pod>(
    trie: &LpmTrie<MapData, K, V>,
) -> impl Iterator<Item = u32> + '_ {
    trie.keys()
        .filter_map(Result::ok)
        .map(|k| k.data().policy_id())
}

/// Whether a map call failed only because the key is not there (a hash map's delete reports
/// ENOENT as a syscall error, a lookup as `KeyNotFound`).
fn is_absent(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// A lookup's value, `None` when no key covers it.
fn absent_is_none<V>(r: Result<V, MapError>, name: &'static str) -> Result<Option<V>, LoaderError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(LoaderError::Map(name, e)),
    }
}

/// Removes one key; a key already gone is fine.
fn remove_key<K: aya::Pod, V: aya::Pod>(
    trie: &mut LpmTrie<MapData, K, V>,
    key: &Key<K>,
    name: &'static str,
) -> Result<(), LoaderError> {
    match trie.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(LoaderError::Map(name, e)),
    }
}

/// Removes every key whose policy id is not in `keep`; returns how many.
fn remove_stale<K: PolicyKeyed, V: aya::Pod>(
    trie: &mut LpmTrie<MapData, K, V>,
    keep: &BTreeSet<u32>,
    name: &'static str,
) -> Result<usize, LoaderError> {
    let stale: Vec<Key<K>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !keep.contains(&k.data().policy_id()))
        .collect();
    for k in &stale {
        remove_key(trie, k, name)?;
    }
    Ok(stale.len())
}

fn key_v4(policy_id: u32, len: u8, addr: [u8; 4]) -> Key<PrefixV4> {
    Key::new(
        POLICY_PREFIX_BITS + len as u32,
        PrefixV4 {
            policy: policy_id.to_be_bytes(),
            addr,
        },
    )
}

fn key_v6(policy_id: u32, len: u8, addr: [u8; 16]) -> Key<PrefixV6> {
    Key::new(
        POLICY_PREFIX_BITS + len as u32,
        PrefixV6 {
            policy: policy_id.to_be_bytes(),
            addr,
        },
    )
}

fn grant_key_v4(agent: u64, len: u8, addr: [u8; 4]) -> Key<GrantKeyV4> {
    Key::new(
        GRANT_AGENT_BITS + len as u32,
        GrantKeyV4 {
            agent: agent.to_be_bytes(),
            addr,
        },
    )
}

fn grant_key_v6(agent: u64, len: u8, addr: [u8; 16]) -> Key<GrantKeyV6> {
    Key::new(
        GRANT_AGENT_BITS + len as u32,
        GrantKeyV6 {
            agent: agent.to_be_bytes(),
            addr,
        },
    )
}

fn key_unix(policy_id: u32, bits: u32, path: [u8; UNIX_PATH_MAX]) -> Key<UnixKey> {
    Key::new(
        POLICY_PREFIX_BITS + bits,
        UnixKey {
            policy: policy_id.to_be_bytes(),
            path,
        },
    )
}

/// Mounts bpffs at `path` when it is not mounted there yet (as Cilium and bpfman do).
pub fn ensure_bpffs(path: &Path) -> Result<(), LoaderError> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let err = |e: io::Error| LoaderError::Bpffs(path.display().to_string(), e);
    std::fs::create_dir_all(path).map_err(err)?;
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| err(e.into()))?;
    // SAFETY: statfs fills the struct; the path is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    if st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    let bpf = CString::new("bpf").expect("no NUL");
    // SAFETY: all arguments are valid C strings; data may be null.
    let rc = unsafe { libc::mount(bpf.as_ptr(), c.as_ptr(), bpf.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use agent_common::names;

    use super::EBPF_OBJECT;

    /// The object the loader embeds defines exactly the maps and programs agent-common names,
    /// so a rename on either side fails here rather than at load time.
    #[test]
    fn the_object_defines_exactly_the_shared_names() {
        let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded eBPF object parses");
        // Sections of globals (.rodata, .bss, .data) are maps to aya too, named by section.
        let maps: BTreeSet<&str> = obj
            .maps
            .keys()
            .map(String::as_str)
            .filter(|n| !n.starts_with('.'))
            .collect();
        let programs: BTreeSet<&str> = obj.programs.keys().map(String::as_str).collect();
        assert_eq!(maps, BTreeSet::from(names::ALL_MAPS), "maps");
        assert_eq!(programs, BTreeSet::from(names::ALL_PROGRAMS), "programs");
    }
}
