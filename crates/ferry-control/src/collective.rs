//! [`Collective`]: the one data-parallel primitive the ack protocol needs, an all-gather of
//! bytes in rank order (a broadcast from rank 0 is an all-gather that keeps rank 0's part).
//! Every rank must call it in lockstep, as with `torch.distributed`.
//!
//! Implementations:
//! * [`SingleRank`] — world size 1: the identity.
//! * [`LocalGroup`] — ranks as threads of one process (tests, single-process runs).
//! * [`SocketGroup`] — ranks as processes: every rank connects to rank 0 over TCP or a Unix
//!   socket; rank 0 collects each round's parts and sends the whole round back. For Rust-only
//!   deployments without `torch.distributed`; Python trainers plug their own process group in
//!   behind the same trait.
//!
//! No call waits for ever: a round that does not complete within the group's timeout fails with
//! `Timeout`, and a peer that dies breaks the round with an `Io` error on every other rank.

use ferry_core::{Error, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most bytes one rank may contribute to one round (a round's id lists are a few MB at most).
pub const MAX_PART_BYTES: u32 = 256 << 20;

/// A data-parallel group's all-gather.
pub trait Collective: Send + Sync {
    /// This process's rank.
    fn rank(&self) -> usize;

    /// How many ranks there are.
    fn world_size(&self) -> usize;

    /// Contributes `part` and returns every rank's part, in rank order.
    fn all_gather(&self, part: Vec<u8>) -> Result<Vec<Vec<u8>>>;

    /// Leaves the group for good after a failure on this rank: every rank waiting in (or later
    /// entering) a round fails at once instead of waiting for its timeout.
    fn abandon(&self) {}

    /// Rank 0's `part`, on every rank.
    fn broadcast_from_rank0(&self, part: Vec<u8>) -> Result<Vec<u8>> {
        self.all_gather(part)?.into_iter().next().ok_or_else(|| Error::Protocol {
            context: "collective broadcast".into(),
            message: "the all-gather returned no part for rank 0".into(),
        })
    }
}

/// A world of one.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl Collective for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_gather(&self, part: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        Ok(vec![part])
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug)]
struct Round {
    generation: u64,
    arrived: usize,
    parts: Vec<Vec<u8>>,
    last: Arc<Vec<Vec<u8>>>,
    /// A rank that failed and left: no round can complete any more.
    abandoned_by: Option<usize>,
}

#[derive(Debug)]
struct LocalShared {
    world: usize,
    timeout: Duration,
    round: Mutex<Round>,
    done: Condvar,
}

/// One rank of a group whose ranks are threads of this process.
#[derive(Debug, Clone)]
pub struct LocalGroup {
    shared: Arc<LocalShared>,
    rank: usize,
}

impl LocalGroup {
    /// `world` ranks; a round not completed within `timeout` fails.
    pub fn new(world: usize, timeout: Duration) -> Vec<LocalGroup> {
        let shared = Arc::new(LocalShared {
            world,
            timeout,
            round: Mutex::new(Round {
                generation: 0,
                arrived: 0,
                parts: vec![Vec::new(); world],
                last: Arc::new(Vec::new()),
                abandoned_by: None,
            }),
            done: Condvar::new(),
        });
        (0..world).map(|rank| LocalGroup { shared: Arc::clone(&shared), rank }).collect()
    }
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn abandon(&self) {
        let mut round = lock(&self.shared.round);
        round.abandoned_by.get_or_insert(self.rank);
        self.shared.done.notify_all();
    }

    fn all_gather(&self, part: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        let shared = &self.shared;
        let abandoned = |by: usize| Error::Collective {
            message: format!("rank {by} failed and left the group; every rank stops (see rank {by}'s error)"),
        };
        let mut round = lock(&shared.round);
        if let Some(by) = round.abandoned_by {
            return Err(abandoned(by));
        }
        let generation = round.generation;
        round.parts[self.rank] = part;
        round.arrived += 1;
        if round.arrived == shared.world {
            let parts = std::mem::replace(&mut round.parts, vec![Vec::new(); shared.world]);
            round.last = Arc::new(parts);
            round.arrived = 0;
            round.generation += 1;
            shared.done.notify_all();
            return Ok(round.last.as_ref().clone());
        }
        // The round's result stays in `last` until every rank read it: no rank can complete
        // the next round before this one arrives at it.
        let deadline = Instant::now() + shared.timeout;
        while round.generation == generation {
            if let Some(by) = round.abandoned_by {
                round.arrived -= 1;
                return Err(abandoned(by));
            }
            let now = Instant::now();
            if now >= deadline {
                let arrived = round.arrived;
                round.arrived -= 1;
                return Err(Error::timeout(
                    format!("a collective round ({arrived} of {} ranks arrived)", shared.world),
                    shared.timeout,
                ));
            }
            round = shared.done.wait_timeout(round, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        Ok(round.last.as_ref().clone())
    }
}

/// Where rank 0 of a [`SocketGroup`] listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupAddress {
    /// `host:port`.
    Tcp(String),
    /// A Unix socket path (all ranks on one node).
    Unix(PathBuf),
}

impl GroupAddress {
    /// Parses `tcp://host:port` or `unix:///path`.
    pub fn parse(s: &str) -> Result<GroupAddress> {
        if let Some(rest) = s.strip_prefix("tcp://") {
            Ok(GroupAddress::Tcp(rest.to_owned()))
        } else if let Some(rest) = s.strip_prefix("unix://") {
            Ok(GroupAddress::Unix(PathBuf::from(rest)))
        } else {
            Err(Error::InvalidArgument(format!("group address {s:?}: expected tcp://host:port or unix:///path")))
        }
    }
}

#[derive(Debug)]
enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn set_timeout(&self, t: Duration) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(Some(t)).and_then(|()| s.set_write_timeout(Some(t))),
            Conn::Unix(s) => s.set_read_timeout(Some(t)).and_then(|()| s.set_write_timeout(Some(t))),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
        }
    }
}

fn write_part(conn: &mut Conn, part: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(part.len()).ok().filter(|l| *l <= MAX_PART_BYTES).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("a {}-byte collective part", part.len()))
    })?;
    conn.write_all(&len.to_le_bytes())?;
    conn.write_all(part)
}

/// Most bytes of a rendezvous hello.
const MAX_HELLO_BYTES: u32 = 4096;

fn read_part(conn: &mut Conn) -> std::io::Result<Vec<u8>> {
    read_part_bounded(conn, MAX_PART_BYTES)
}

fn read_part_bounded(conn: &mut Conn, limit: u32) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    conn.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a peer announced a {len}-byte collective part (limit {limit})"),
        ));
    }
    let mut part = vec![0u8; len as usize];
    conn.read_exact(&mut part)?;
    Ok(part)
}

/// One rank of a group whose ranks are processes connected to rank 0.
#[derive(Debug)]
pub struct SocketGroup {
    rank: usize,
    world: usize,
    /// Rank 0: the peers' connections, index `r - 1` for rank `r`. Others: the one to rank 0.
    /// `None` once a round broke the group.
    conns: Mutex<Option<Vec<Conn>>>,
    /// How long one round may take.
    timeout: Duration,
}

/// What a joining rank says first.
#[derive(serde::Serialize, serde::Deserialize)]
struct Hello {
    group: String,
    rank: usize,
    world: usize,
}

impl SocketGroup {
    /// Forms the group: rank 0 listens at `address` and waits for the other `world - 1` ranks;
    /// the others connect (retrying until rank 0 listens). Every rank must name the same
    /// `group` and `world`. `timeout` bounds the rendezvous and every later round.
    pub fn rendezvous(
        address: &GroupAddress,
        group: &str,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<SocketGroup> {
        if world == 0 || rank >= world {
            return Err(Error::InvalidArgument(format!("collective rank {rank} of world {world}")));
        }
        let deadline = Instant::now() + timeout;
        let io = |what: &str, e: std::io::Error| Error::io(format!("collective rendezvous at {address:?}: {what}"), &e);
        let conns = if rank == 0 {
            let mut peers: Vec<Option<Conn>> = (1..world).map(|_| None).collect();
            let accept = Self::listener(address).map_err(|e| io("listening", e))?;
            let mut joined = 0;
            while joined + 1 < world {
                let Some(mut conn) = accept(deadline).map_err(|e| io("accepting", e))? else {
                    return Err(Error::timeout(
                        format!("{} of {} ranks to join collective group {group:?}", world - 1 - joined, world - 1),
                        timeout,
                    ));
                };
                // A stray or malformed connection is skipped, never fatal to the rendezvous.
                let hello = conn
                    .set_timeout(Duration::from_secs(5).min(timeout))
                    .and_then(|()| read_part_bounded(&mut conn, MAX_HELLO_BYTES))
                    .ok()
                    .and_then(|bytes| serde_json::from_slice::<Hello>(&bytes).ok());
                let Some(hello) = hello else {
                    tracing::warn!("skipped a connection that did not send a collective hello");
                    continue;
                };
                conn.set_timeout(timeout).map_err(|e| io("configuring", e))?;
                let valid = hello.group == group
                    && hello.world == world
                    && (1..world).contains(&hello.rank)
                    && peers[hello.rank - 1].is_none();
                if !valid {
                    let _ = write_part(&mut conn, b"refused");
                    tracing::warn!(rank = hello.rank, group = %hello.group, "refused a collective peer");
                    continue;
                }
                write_part(&mut conn, b"ok").map_err(|e| io("welcoming", e))?;
                peers[hello.rank - 1] = Some(conn);
                joined += 1;
            }
            peers.into_iter().flatten().collect()
        } else {
            let mut conn = loop {
                match Self::connect(address) {
                    Ok(conn) => break conn,
                    Err(e) if Instant::now() < deadline => {
                        tracing::trace!(error = %e, "rank 0 not listening yet");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(io("connecting to rank 0", e)),
                }
            };
            conn.set_timeout(timeout).map_err(|e| io("configuring", e))?;
            let hello = serde_json::to_vec(&Hello { group: group.to_owned(), rank, world })
                .map_err(|e| Error::InvalidArgument(format!("encoding a hello: {e}")))?;
            write_part(&mut conn, &hello).map_err(|e| io("sending the hello", e))?;
            let answer = read_part(&mut conn).map_err(|e| io("reading the welcome", e))?;
            if answer != b"ok" {
                return Err(Error::InvalidArgument(format!(
                    "rank 0 of collective group {group:?} refused rank {rank} of world {world} \
                     (another group, another world size, or the rank joined twice)"
                )));
            }
            vec![conn]
        };
        Ok(SocketGroup { rank, world, conns: Mutex::new(Some(conns)), timeout })
    }

    /// A function accepting one connection until a deadline (`None` at the deadline).
    #[allow(clippy::type_complexity)]
    fn listener(address: &GroupAddress) -> std::io::Result<Box<dyn Fn(Instant) -> std::io::Result<Option<Conn>>>> {
        fn poll<T>(deadline: Instant, mut accept: impl FnMut() -> std::io::Result<T>) -> std::io::Result<Option<T>> {
            loop {
                match accept() {
                    Ok(t) => return Ok(Some(t)),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() >= deadline {
                            return Ok(None);
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        match address {
            GroupAddress::Tcp(addr) => {
                let listener = TcpListener::bind(addr)?;
                listener.set_nonblocking(true)?;
                Ok(Box::new(move |deadline| {
                    let conn = poll(deadline, || listener.accept())?;
                    conn.map(|(s, _)| {
                        s.set_nonblocking(false)?;
                        s.set_nodelay(true)?;
                        Ok(Conn::Tcp(s))
                    })
                    .transpose()
                }))
            }
            GroupAddress::Unix(path) => {
                let listener = UnixListener::bind(path)?;
                listener.set_nonblocking(true)?;
                Ok(Box::new(move |deadline| {
                    let conn = poll(deadline, || listener.accept())?;
                    conn.map(|(s, _)| {
                        s.set_nonblocking(false)?;
                        Ok(Conn::Unix(s))
                    })
                    .transpose()
                }))
            }
        }
    }

    fn connect(address: &GroupAddress) -> std::io::Result<Conn> {
        match address {
            GroupAddress::Tcp(addr) => {
                let s = TcpStream::connect(addr)?;
                s.set_nodelay(true)?;
                Ok(Conn::Tcp(s))
            }
            GroupAddress::Unix(path) => Ok(Conn::Unix(UnixStream::connect(path)?)),
        }
    }

    fn round(&self, conns: &mut [Conn], part: Vec<u8>) -> std::io::Result<Vec<Vec<u8>>> {
        if self.rank == 0 {
            let mut parts = Vec::with_capacity(self.world);
            parts.push(part);
            for conn in conns.iter_mut() {
                parts.push(read_part(conn)?);
            }
            let count = (parts.len() as u32).to_le_bytes();
            for conn in conns.iter_mut() {
                conn.write_all(&count)?;
                for p in &parts {
                    write_part(conn, p)?;
                }
            }
            Ok(parts)
        } else {
            let conn = conns.first_mut().ok_or_else(|| std::io::Error::other("no connection to rank 0"))?;
            write_part(conn, &part)?;
            let mut count = [0u8; 4];
            conn.read_exact(&mut count)?;
            let count = u32::from_le_bytes(count) as usize;
            if count != self.world {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("rank 0 sent {count} parts for a world of {}", self.world),
                ));
            }
            (0..count).map(|_| read_part(conn)).collect()
        }
    }
}

impl Collective for SocketGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn abandon(&self) {
        // Closing the connections ends every peer's round with an error.
        *lock(&self.conns) = None;
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_gather(&self, part: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        let mut guard = lock(&self.conns);
        let Some(conns) = guard.as_mut() else {
            return Err(Error::PeerLost {
                context: format!("collective rank {}", self.rank),
                message: "an earlier round broke the group; every rank must restart".into(),
            });
        };
        match self.round(conns, part) {
            Ok(parts) => Ok(parts),
            Err(e) => {
                // Closing our side makes every peer's round fail too, instead of hanging.
                *guard = None;
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
                    return Err(Error::timeout(
                        format!(
                            "a collective round on rank {} (a rank did not reach the same optimizer boundary: every \
                             rank must ack at every boundary; or raise the group timeout)",
                            self.rank
                        ),
                        self.timeout,
                    ));
                }
                Err(Error::PeerLost {
                    context: format!("collective all-gather on rank {}", self.rank),
                    message: format!("a peer's connection closed (its process ended or it left the group): {e}"),
                })
            }
        }
    }
}
