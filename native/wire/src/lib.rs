//! The wire port's byte path: pooled transactions relayed on a thread of their own.
//!
//! Python keeps the control plane (startup, authentication, the SQL guard, settings, every
//! statement it has not seen the shape of, transactions the client opens, COPY, the extended
//! protocol). When a client's session is idle, Python may *delegate* it here: the relay then
//! reads the client's messages itself and runs each simple `Query` whose shape Python has
//! allowed for that session's class (tenant schema and service) on a server connection
//! Python lent it, forwarding the answers untouched, with no Python on the way. The first
//! message it does not handle, it hands back (with what it has read) and Python goes on.
//!
//! Nothing here decides what a tenant may run: a shape is allowed only by Python, after the
//! guard's verdict for it; server connections are Python's (logged in as the tenant's own
//! role), lent while idle and given back. The relay never closes a socket: Python owns them.
//!
//! Threads: Python calls only lock the state and queue a command, then wake the relay's
//! thread (mio's Waker). The relay's thread never takes the GIL; it tells Python by writing a
//! byte to a pipe Python watches, for events Python must act on soon (a session handed back,
//! a server wanted or given back); figures (statements done) wait for Python's next drain.

mod front;
mod shape;

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

const WAKER: Token = Token(0);
const READ_CHUNK: usize = 65536;
// A client that does not take its rows: past this much queued for it, the relay stops
// reading the server (the server then waits, as it would for a slow client of its own).
const CLIENT_BACKLOG: usize = 1 << 20;
// A client pipelining more than this while its statement runs is not read further until
// the statement is done.
const CLIENT_AHEAD: usize = 1 << 20;
// Messages larger than this go to Python (which checks them against the port's limits).
const MAX_FAST_MESSAGE: usize = 1 << 20;
// Server connections idle here this long go back to Python's pool, and so does one lent
// for longer than LENT_MAX once idle: the pool's idle and lifetime limits stay Python's.
const IDLE_RETURN: Duration = Duration::from_secs(1);
const LENT_MAX: Duration = Duration::from_secs(60);
const SHAPES_MAX: usize = 65536;

fn token_of_session(id: u64) -> Token {
    Token((id as usize) * 2 + 2)
}
fn token_of_server(id: u64) -> Token {
    Token((id as usize) * 2 + 3)
}

enum Event {
    Returned {
        session: u64,
        leftover: Vec<u8>,
        pending: Vec<u8>,
        key: Option<Vec<u8>>,
        normalized: Option<Vec<u8>>,
        ran: bool,
        server: Option<u64>,
        status: u8,
        close: bool,
        wanted: Vec<(String, String)>,
        applied: Vec<(String, String)>,
        prepared: Vec<Vec<u8>>,
        prepared_bytes: usize,
    },
    Failed { session: u64, verdict: u32, sqlstate: String, message: String },
    Setting { server: u64, name: String, value: String },
    Need { pool: u64 },
    Back { server: u64, broken: bool, applied: Vec<(String, String)>, prepared: Vec<Vec<u8>>, prepared_bytes: usize },
    Expired { session: u64, server: u64 },
    Count { pool: u64, transactions: u64, queries: u64 },
}

impl Event {
    fn urgent(&self) -> bool {
        matches!(self, Event::Returned { .. } | Event::Need { .. } | Event::Back { .. } | Event::Expired { .. })
    }
}

/// (client's name, server's name, Parse under the server's name, verdict, text), from Python.
type AllowedStatement = (Vec<u8>, Vec<u8>, Vec<u8>, u32, Vec<u8>);

/// A client's named prepared statement Python allowed the relay to run.
struct Statement {
    server_name: Vec<u8>,
    parse: Vec<u8>, // the Parse message under the server's name
    verdict: u32,
    sql: Vec<u8>,
}

#[derive(PartialEq)]
enum Phase {
    Idle,
    Waiting,
    Settings,
    Active,
}

struct Session {
    fd: RawFd,
    pool: u64,
    class: u64,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    wanted: Vec<(String, String, String)>, // name, value, its SET statement
    limit: Duration,
    phase: Phase,
    server: Option<u64>,
    message: Vec<u8>, // the Query or Bind..Sync batch being run (or waiting for a server)
    statement: Option<Vec<u8>>, // the batch's prepared statement (client's name), if a batch
    swallow_parse: bool, // the relay prepared the statement on this server: hide its '1'
    statements: HashMap<Vec<u8>, Statement>,
    verdict: u32,
    started: Instant,
    deadline: Option<Instant>,
    expired: bool,
    // The running statement's failure was reported (an ErrorResponse): a lost server after
    // it (a terminated backend says why first) is not a second failure.
    reported: bool,
    ran: bool,
    writable: bool, // registered for writability
    eof: bool,
    unread: bool, // its last read stopped at the buffer's limit: more may wait in the socket
    status: u8, // the transaction status of its last ReadyForQuery
    limit_ms: u64,
    pool_max: usize,
}

struct Server {
    fd: RawFd,
    pool: u64,
    applied: HashMap<String, String>,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    session: Option<u64>,
    broken: bool,
    hold: bool, // a cancel is on its way: never lent again here
    idle_since: Instant,
    lent_at: Instant,
    paused: bool, // not read while its client's backlog is full
    setting_error: bool,
    prepared: std::collections::HashSet<Vec<u8>>,
    prepared_bytes: usize,
    prepared_max: usize,
    writable: bool, // registered for writability
}

#[derive(Default)]
struct PoolState {
    max: usize,
    idle: Vec<u64>,
    waiters: VecDeque<u64>,
    requested: usize,
    reclaims: usize,
    transactions: u64,
    queries: u64,
}

#[derive(Default)]
struct Completed {
    micros: Vec<u8>, // each statement's time, u32 in this machine's byte order
    rows: u64,
    sql: Vec<u8>, // the first statement's text (the group shares its shape)
}

enum Command {
    Pump(u64),
    Serve(u64),
    ReclaimIdle,
}

struct State {
    sessions: HashMap<u64, Session>,
    servers: HashMap<u64, Server>,
    pools: HashMap<u64, PoolState>,
    shapes: HashMap<u64, HashMap<Vec<u8>, u32>>, // class -> shape key -> verdict
    shape_count: usize,
    events: Vec<Event>,
    // Statements completed since the last take, by (session, verdict, command tag): Python
    // books them together (one call per group, not per statement).
    done: HashMap<(u64, u32, Vec<u8>), Completed>,
    commands: Vec<Command>,
    // Sessions whose statement has a deadline (a superset: entries whose deadline was
    // cleared are dropped by the next ``timers``), so a turn's timers cost what is running,
    // not every idle client the relay watches.
    timed: HashSet<u64>,
    signaled: bool,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    registry: Registry,
    waker: Waker,
    notify: RawFd,
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read_all(fd: RawFd, buf: &mut Vec<u8>, limit: usize) -> (bool, bool) {
    // (eof or error, drained); reads until a short read, EAGAIN or ``limit`` bytes buffered.
    // A short read drained the socket: with edge-triggered polling, data that comes after it
    // makes a new edge, so the read that would only say EAGAIN is saved (one system call per
    // readable socket).
    loop {
        if buf.len() >= limit {
            return (false, false);
        }
        let start = buf.len();
        buf.reserve(READ_CHUNK);
        let spare = buf.capacity() - start;
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().add(start) as *mut libc::c_void, spare) };
        if n > 0 {
            unsafe { buf.set_len(start + n as usize) };
            if (n as usize) < spare {
                return (false, true);
            }
            continue;
        }
        if n == 0 {
            return (true, false);
        }
        let err = std::io::Error::last_os_error();
        match err.kind() {
            std::io::ErrorKind::WouldBlock => return (false, true),
            std::io::ErrorKind::Interrupted => continue,
            _ => return (true, false),
        }
    }
}

/// Writes what it can of ``buf`` (drained from the front): Err on a broken socket.
fn write_some(fd: RawFd, buf: &mut Vec<u8>) -> Result<(), ()> {
    let mut written = 0;
    while written < buf.len() {
        let rest = &buf[written..];
        let n = unsafe {
            libc::send(fd, rest.as_ptr() as *const libc::c_void, rest.len(), libc::MSG_NOSIGNAL)
        };
        if n >= 0 {
            written += n as usize;
            continue;
        }
        let err = std::io::Error::last_os_error();
        match err.kind() {
            std::io::ErrorKind::WouldBlock => break,
            std::io::ErrorKind::Interrupted => continue,
            _ => return Err(()),
        }
    }
    buf.drain(..written);
    Ok(())
}

/// Watch ``fd`` for writability while it has bytes queued (``watched``: whether it is now).
fn watch_writes(shared: &Shared, fd: RawFd, token: Token, watched: &mut bool, queued: bool) {
    if queued != *watched {
        *watched = queued;
        let interest = if queued { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
        let _ = shared.registry.reregister(&mut SourceFd(&fd), token, interest);
    }
}

fn message_at(buf: &[u8], at: usize) -> Option<(u8, usize)> {
    // (kind, total length incl. kind byte) of a whole message at ``at``, or None.
    if buf.len() < at + 5 {
        return None;
    }
    let len = u32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]) as usize;
    if len < 4 {
        return Some((buf[at], 0)); // invalid: handled by whoever owns the stream
    }
    if buf.len() < at + 1 + len {
        return None;
    }
    Some((buf[at], 1 + len))
}

fn error_fields(body: &[u8]) -> (String, String) {
    let mut code = String::new();
    let mut message = String::new();
    let mut i = 0;
    while i < body.len() && body[i] != 0 {
        let field = body[i];
        let end = body[i + 1..].iter().position(|&b| b == 0).map(|p| i + 1 + p).unwrap_or(body.len());
        let value = String::from_utf8_lossy(&body[i + 1..end]).into_owned();
        if field == b'C' {
            code = value;
        } else if field == b'M' {
            message = value;
        }
        i = end + 1;
    }
    (code, message)
}

fn cstring_pair(body: &[u8]) -> (String, String) {
    let mut parts = body.split(|&b| b == 0);
    let name = String::from_utf8_lossy(parts.next().unwrap_or(b"")).into_owned();
    let value = String::from_utf8_lossy(parts.next().unwrap_or(b"")).into_owned();
    (name, value)
}

fn error_message(severity: &str, code: &str, text: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [(b'S', severity), (b'V', severity), (b'C', code), (b'M', text)] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = vec![b'E'];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

const READY_IDLE: [u8; 6] = [b'Z', 0, 0, 0, 5, b'I'];

enum Batch {
    More,
    Other,
    Run { total: usize, verdict: u32, name: Vec<u8> },
}

/// An extended-protocol batch the relay runs: Bind of a statement Python allowed, Describe of
/// its portal (optional), Execute of it, Sync; anything else is Python's.
fn batch(buf: &[u8], statements: &HashMap<Vec<u8>, Statement>) -> Batch {
    let Some((kind, bind)) = message_at(buf, 0) else { return Batch::More };
    if kind != b'B' || !(7..=MAX_FAST_MESSAGE).contains(&bind) {
        return Batch::Other;
    }
    let payload = &buf[5..bind];
    let Some(portal_end) = payload.iter().position(|&c| c == 0) else { return Batch::Other };
    let portal = &payload[..portal_end];
    let rest = &payload[portal_end + 1..];
    let Some(name_end) = rest.iter().position(|&c| c == 0) else { return Batch::Other };
    let name = &rest[..name_end];
    let Some(statement) = (!name.is_empty()).then(|| statements.get(name)).flatten() else {
        return Batch::Other;
    };
    let mut at = bind;
    match message_at(buf, at) {
        None => return Batch::More,
        Some((b'D', total)) => {
            if total != 7 + portal.len() || buf[at + 5] != b'P' || &buf[at + 6..at + total - 1] != portal || buf[at + total - 1] != 0 {
                return Batch::Other;
            }
            at += total;
        }
        Some(_) => {}
    }
    match message_at(buf, at) {
        None => return Batch::More,
        Some((b'E', total)) if total == 10 + portal.len() && &buf[at + 5..at + 5 + portal.len()] == portal && buf[at + 5 + portal.len()] == 0 => {
            at += total;
        }
        Some(_) => return Batch::Other,
    }
    match message_at(buf, at) {
        None => Batch::More,
        Some((b'S', 5)) => Batch::Run { total: at + 5, verdict: statement.verdict, name: name.to_vec() },
        Some(_) => Batch::Other,
    }
}

/// What the server gets for the session's statement: the Query as sent, or the batch with the
/// statement under its server name (prepared there first if it is not yet). None: the
/// connection has no room for another prepared statement.
fn statement_bytes(session: &mut Session, server: &mut Server) -> Option<Vec<u8>> {
    let Some(name) = session.statement.as_ref() else { return Some(session.message.clone()) };
    let statement = session.statements.get(name)?;
    let mut out = Vec::with_capacity(session.message.len() + statement.parse.len() + 64);
    session.swallow_parse = false;
    if !server.prepared.contains(&statement.server_name) {
        if server.prepared_bytes + statement.parse.len() > server.prepared_max {
            return None;
        }
        server.prepared_bytes += statement.parse.len();
        out.extend_from_slice(&statement.parse);
        session.swallow_parse = true;
    }
    let message = &session.message;
    let (_, bind) = message_at(message, 0)?;
    let payload = &message[5..bind];
    let portal_end = payload.iter().position(|&c| c == 0)?;
    let rest_at = portal_end + 1 + payload[portal_end + 1..].iter().position(|&c| c == 0)? + 1;
    let length = 4 + portal_end + 1 + statement.server_name.len() + 1 + (payload.len() - rest_at);
    out.push(b'B');
    out.extend_from_slice(&(length as u32).to_be_bytes());
    out.extend_from_slice(&payload[..=portal_end]);
    out.extend_from_slice(&statement.server_name);
    out.push(0);
    out.extend_from_slice(&payload[rest_at..]);
    out.extend_from_slice(&message[bind..]);
    Some(out)
}

/// Book a statement of ``session`` that completed (CommandComplete ``tag``) in its group: its
/// time and rows; the group's text is copied once, from its first statement.
fn completed(done: &mut HashMap<(u64, u32, Vec<u8>), Completed>, id: u64, session: &Session, tag: &[u8]) {
    let command = tag.split(|&b| b == b' ').next().unwrap_or_default().to_vec();
    let group = done.entry((id, session.verdict, command)).or_default();
    if group.micros.is_empty() {
        group.sql = match session.statement.as_ref().and_then(|n| session.statements.get(n)) {
            Some(statement) => statement.sql.clone(),
            None => session.message.get(5..session.message.len().saturating_sub(1)).unwrap_or_default().to_vec(),
        };
    }
    let micros = session.started.elapsed().as_micros().min(u32::MAX as u128) as u32;
    group.micros.extend_from_slice(&micros.to_ne_bytes());
    let rows = tag.rsplit(|&b| b == b' ').next().and_then(|n| std::str::from_utf8(n).ok()?.parse::<u64>().ok());
    group.rows += rows.unwrap_or(0);
}

impl State {
    fn emit(&mut self, shared: &Shared, event: Event) {
        let urgent = event.urgent();
        self.events.push(event);
        if urgent && !self.signaled {
            self.signaled = true;
            let byte = [1u8];
            unsafe { libc::write(shared.notify, byte.as_ptr() as *const libc::c_void, 1) };
        }
    }

    /// Hand a session back to Python: it stops being watched here first.
    fn hand_back(&mut self, shared: &Shared, id: u64, key: Option<(Vec<u8>, Vec<u8>)>, close: bool) {
        let Some(mut session) = self.sessions.remove(&id) else { return };
        let _ = shared.registry.deregister(&mut SourceFd(&session.fd));
        if let Some(pool) = self.pools.get_mut(&session.pool) {
            pool.waiters.retain(|&w| w != id);
        }
        if session.phase == Phase::Waiting || session.phase == Phase::Settings {
            // The message it waited with goes back in front of what it sent after it.
            let mut leftover = std::mem::take(&mut session.message);
            leftover.extend_from_slice(&session.inbuf);
            session.inbuf = leftover;
        }
        let mut server = None;
        let mut status = b'I';
        let mut applied = Vec::new();
        let mut prepared = Vec::new();
        let mut prepared_bytes = 0;
        if let Some(sid) = session.server.take() {
            if session.phase == Phase::Settings {
                // Its settings failed: the server goes back broken (below, by the caller).
            } else if let Some(srv) = self.servers.remove(&sid) {
                let _ = shared.registry.deregister(&mut SourceFd(&srv.fd));
                status = session.status;
                server = Some(sid);
                applied = srv.applied.into_iter().collect();
                prepared = srv.prepared.into_iter().collect();
                prepared_bytes = srv.prepared_bytes;
            }
        }
        let (key, normalized) = match key {
            Some((k, n)) => (Some(k), Some(n)),
            None => (None, None),
        };
        self.emit(
            shared,
            Event::Returned {
                session: id,
                leftover: session.inbuf,
                pending: session.out,
                key,
                normalized,
                ran: session.ran,
                server,
                status,
                close,
                wanted: session.wanted.into_iter().map(|(n, v, _)| (n, v)).collect(),
                applied,
                prepared,
                prepared_bytes,
            },
        );
    }

    /// Give a server back to Python's pool (broken: Python closes it).
    fn give_back(&mut self, shared: &Shared, id: u64, broken: bool) {
        let Some(server) = self.servers.remove(&id) else { return };
        let _ = shared.registry.deregister(&mut SourceFd(&server.fd));
        if let Some(pool) = self.pools.get_mut(&server.pool) {
            pool.idle.retain(|&s| s != id);
        }
        self.request(shared, server.pool);
        let applied = server.applied.into_iter().collect();
        let prepared = server.prepared.into_iter().collect();
        self.emit(
            shared,
            Event::Back {
                server: id,
                broken: broken || server.broken,
                applied,
                prepared,
                prepared_bytes: server.prepared_bytes,
            },
        );
    }

    /// Run whatever whole messages a session has buffered while it is idle.
    fn pump(&mut self, shared: &Shared, id: u64) {
        {
            let Some(session) = self.sessions.get_mut(&id) else { return };
            if session.phase != Phase::Idle {
                return;
            }
            let Some((kind, total)) = message_at(&session.inbuf, 0) else {
                if session.eof {
                    self.hand_back(shared, id, None, false);
                } else if session.inbuf.len() >= 5 {
                    // A message longer than the relay takes: Python reads the rest.
                    let len = u32::from_be_bytes([session.inbuf[1], session.inbuf[2], session.inbuf[3], session.inbuf[4]]) as usize;
                    if len > MAX_FAST_MESSAGE {
                        self.hand_back(shared, id, None, false);
                    }
                }
                return;
            };
            let (total, verdict, statement) = if kind == b'B' {
                match batch(&session.inbuf, &session.statements) {
                    Batch::More => {
                        if session.eof || session.inbuf.len() > MAX_FAST_MESSAGE {
                            self.hand_back(shared, id, None, false);
                        }
                        return;
                    }
                    Batch::Other => {
                        self.hand_back(shared, id, None, false);
                        return;
                    }
                    Batch::Run { total, verdict, name } => (total, verdict, Some(name)),
                }
            } else {
                if kind != b'Q' || !(6..=MAX_FAST_MESSAGE).contains(&total) || session.inbuf[total - 1] != 0 {
                    self.hand_back(shared, id, None, false);
                    return;
                }
                let text = &session.inbuf[5..total - 1];
                if text.contains(&0) {
                    self.hand_back(shared, id, None, false);
                    return;
                }
                let Some((normalized, kinds)) = shape::shape(text) else {
                    self.hand_back(shared, id, None, false);
                    return;
                };
                let mut key = normalized.clone();
                key.push(0);
                key.extend_from_slice(&kinds);
                let Some(&verdict) = self.shapes.get(&session.class).and_then(|m| m.get(key.as_slice())) else {
                    self.hand_back(shared, id, Some((key, normalized)), false);
                    return;
                };
                (total, verdict, None)
            };
            session.message = session.inbuf.drain(..total).collect();
            session.statement = statement;
            session.verdict = verdict;
            session.started = Instant::now();
            let pool_id = session.pool;
            let pool_max = session.pool_max;
            let pool = self.pools.entry(pool_id).or_default();
            pool.max = pool_max;
            if let Some(sid) = pool.idle.pop() {
                self.start(shared, id, sid);
            } else {
                session.phase = Phase::Waiting;
                pool.waiters.push_back(id);
                self.request(shared, pool_id);
            }
        }
    }

    /// Ask Python for servers of pool ``pool_id``: one per waiter, up to the pool's size with
    /// those held here (the rest wait for the held ones to finish). Called when a client
    /// starts waiting and whenever a server leaves the relay, so waiters never wait on
    /// servers that are gone.
    fn request(&mut self, shared: &Shared, pool_id: u64) {
        let held = self.servers.values().filter(|s| s.pool == pool_id).count();
        let mut needs = 0;
        if let Some(pool) = self.pools.get_mut(&pool_id) {
            while pool.waiters.len() > pool.requested && held + pool.requested < pool.max {
                pool.requested += 1;
                needs += 1;
            }
        }
        for _ in 0..needs {
            self.emit(shared, Event::Need { pool: pool_id });
        }
    }

    /// Lend server ``sid`` to session ``id`` for its statement (its settings first).
    fn start(&mut self, shared: &Shared, id: u64, sid: u64) {
        let (Some(session), Some(server)) = (self.sessions.get_mut(&id), self.servers.get_mut(&sid)) else {
            return;
        };
        server.session = Some(id);
        session.server = Some(sid);
        let changes: Vec<&str> = session
            .wanted
            .iter()
            .filter(|(name, value, _)| server.applied.get(name) != Some(value))
            .map(|(_, _, sql)| sql.as_str())
            .collect();
        if changes.is_empty() {
            let Some(bytes) = statement_bytes(session, server) else {
                // Past the connection's prepared-statement budget: Python refuses it (54000).
                server.session = None;
                session.server = None;
                let pool_id = server.pool;
                self.release(shared, pool_id, sid);
                let s = self.sessions.get_mut(&id).unwrap();
                s.phase = Phase::Waiting; // its message goes back in front
                self.hand_back(shared, id, None, false);
                return;
            };
            session.phase = Phase::Active;
            server.out.extend_from_slice(&bytes);
            session.ran = true;
            session.deadline = Some(Instant::now() + session.limit);
            session.reported = false;
            self.timed.insert(id);
            if let Some(pool) = self.pools.get_mut(&session.pool) {
                pool.queries += 1;
            }
        } else {
            let sql = changes.join(";");
            session.phase = Phase::Settings;
            server.setting_error = false;
            server.out.push(b'Q');
            server.out.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
            server.out.extend_from_slice(sql.as_bytes());
            server.out.push(0);
        }
        self.flush_server(shared, sid);
    }

    /// Write what is queued for the server; what the socket does not take now waits for its
    /// writability (a statement larger than the socket's buffer).
    fn flush_server(&mut self, shared: &Shared, sid: u64) {
        let Some(server) = self.servers.get_mut(&sid) else { return };
        if write_some(server.fd, &mut server.out).is_err() {
            self.server_lost(shared, sid);
            return;
        }
        watch_writes(shared, server.fd, token_of_server(sid), &mut server.writable, !server.out.is_empty());
    }

    fn server_lost(&mut self, shared: &Shared, sid: u64) {
        let session = self.servers.get(&sid).and_then(|s| s.session);
        self.give_back(shared, sid, true);
        let Some(id) = session else { return };
        let Some(s) = self.sessions.get_mut(&id) else { return };
        s.server = None;
        match s.phase {
            Phase::Settings => self.hand_back(shared, id, None, false), // its message with it
            Phase::Active if s.expired => {
                // Terminated past the tenant's limit, outside any block of the client's: that
                // statement fails and the client goes on, as on the Python path.
                let text = format!(
                    "the statement exceeded the tenant's limit of {} ms and was canceled",
                    s.limit_ms
                );
                s.out.extend_from_slice(&error_message("ERROR", "57014", &text));
                s.out.extend_from_slice(&READY_IDLE);
                s.phase = Phase::Idle;
                s.expired = false;
                s.deadline = None;
                // Audited and counted as a failed statement, as a server's error would be.
                let failed = Event::Failed { session: id, verdict: s.verdict, sqlstate: "57014".into(), message: text };
                self.emit(shared, failed);
                self.flush_client(shared, id);
                self.pump(shared, id);
            }
            _ => {
                let text = "the server connection was lost";
                s.out.extend_from_slice(&error_message("FATAL", "08006", text));
                let running = s.phase == Phase::Active && !s.reported;
                s.phase = Phase::Idle;
                if running {
                    let failed = Event::Failed { session: id, verdict: s.verdict, sqlstate: "08006".into(), message: text.into() };
                    self.emit(shared, failed);
                }
                self.flush_client(shared, id);
                self.hand_back(shared, id, None, true);
            }
        }
    }

    /// The server's socket is readable (``closed``: PostgreSQL closed it, said by the event).
    fn server_input(&mut self, shared: &Shared, sid: u64, closed: bool) {
        loop {
            let Some(server) = self.servers.get_mut(&sid) else { return };
            if server.paused {
                return; // read again once its client has taken its backlog
            }
            let (gone, drained) = read_all(server.fd, &mut server.inbuf, 4 * READ_CHUNK);
            let gone = gone || (closed && drained);
            let Some(id) = server.session else {
                // Idle here: PostgreSQL said something on its own (it is closing, most likely).
                if gone || !server.inbuf.is_empty() {
                    self.give_back(shared, sid, true);
                }
                return;
            };
            self.relay(shared, id, sid);
            if gone {
                if self.servers.contains_key(&sid) {
                    self.server_lost(shared, sid);
                }
                return;
            }
            if drained {
                return;
            }
            // Stopped at the buffer's limit (a large result): more is waiting in the socket,
            // and no new edge will say so.
        }
    }

    /// Forward the server's whole messages to its client; at ReadyForQuery the transaction
    /// is over and the server goes back to the idle list.
    fn relay(&mut self, shared: &Shared, id: u64, sid: u64) {
        let mut events: Vec<Event> = Vec::new();
        let mut finished: Option<u8> = None;
        let mut retry_later = false;
        let mut flush_after = false; // the statement, queued after its settings took
        {
            let (Some(session), Some(server)) = (self.sessions.get_mut(&id), self.servers.get_mut(&sid)) else {
                return;
            };
            let mut at = 0;
            let buf = std::mem::take(&mut server.inbuf);
            while let Some((kind, total)) = message_at(&buf, at) {
                if total == 0 {
                    server.broken = true;
                    break;
                }
                let raw = &buf[at..at + total];
                at += total;
                if session.phase == Phase::Settings {
                    match kind {
                        b'E' => server.setting_error = true,
                        b'S' => {
                            let (name, value) = cstring_pair(&raw[5..]);
                            server.applied.insert(name, value);
                        }
                        b'Z' => {
                            if server.setting_error {
                                server.broken = true;
                                retry_later = true;
                            } else {
                                for (name, value, _) in &session.wanted {
                                    server.applied.insert(name.clone(), value.clone());
                                }
                                let Some(bytes) = statement_bytes(session, server) else {
                                    retry_later = true;
                                    break;
                                };
                                session.phase = Phase::Active;
                                session.ran = true;
                                session.deadline = Some(Instant::now() + session.limit);
                                session.reported = false;
                                self.timed.insert(id);
                                server.out.extend_from_slice(&bytes);
                                flush_after = true;
                                events.push(Event::Count { pool: session.pool, transactions: 0, queries: 1 });
                            }
                        }
                        _ => {}
                    }
                    if retry_later {
                        break;
                    }
                    continue;
                }
                match kind {
                    b'1' if session.swallow_parse => {
                        // The relay's own Parse of the client's statement on this connection.
                        session.swallow_parse = false;
                        if let Some(stmt) = session.statement.as_ref().and_then(|n| session.statements.get(n)) {
                            server.prepared.insert(stmt.server_name.clone());
                        }
                    }
                    b'C' => {
                        let tag = raw.get(5..total.saturating_sub(1)).unwrap_or_default();
                        completed(&mut self.done, id, session, tag);
                        session.out.extend_from_slice(raw);
                    }
                    b'E' => {
                        session.swallow_parse = false;
                        if session.expired && raw.windows(7).any(|w| w == b"SFATAL\0") {
                            continue; // the backend's own "terminating connection"
                        }
                        let (sqlstate, message) = error_fields(&raw[5..]);
                        session.reported = true;
                        events.push(Event::Failed { session: id, verdict: session.verdict, sqlstate, message });
                        session.out.extend_from_slice(raw);
                    }
                    b'S' => {
                        let (name, value) = cstring_pair(&raw[5..]);
                        for wanted in session.wanted.iter_mut() {
                            if wanted.0 == name {
                                wanted.1 = value.clone();
                            }
                        }
                        server.applied.insert(name.clone(), value.clone());
                        events.push(Event::Setting { server: sid, name, value });
                        session.out.extend_from_slice(raw);
                    }
                    b'Z' => {
                        session.out.extend_from_slice(raw);
                        finished = Some(raw.get(5).copied().unwrap_or(b'I'));
                        break;
                    }
                    b'G' | b'H' | b'W' => {
                        // COPY from a statement the guard let through as a plain one: the relay
                        // cannot do it; the server is lost to this client (never happens for
                        // the shapes Python allows).
                        server.broken = true;
                        session.eof = true;
                        break;
                    }
                    _ => session.out.extend_from_slice(raw),
                }
            }
            let mut rest = buf;
            rest.drain(..at.min(rest.len()));
            server.inbuf = rest;
        }
        if flush_after {
            self.flush_server(shared, sid);
        }
        for event in events {
            if let Event::Count { pool, queries, .. } = event {
                if let Some(p) = self.pools.get_mut(&pool) {
                    p.queries += queries;
                }
            } else {
                self.emit(shared, event);
            }
        }
        if retry_later {
            // The settings failed: the server goes back broken, the statement to Python.
            self.sessions.get_mut(&id).unwrap().server = None; // still in Settings: see hand_back
            self.give_back(shared, sid, true);
            self.hand_back(shared, id, None, false);
            return;
        }
        let eof = self.sessions.get(&id).map(|s| s.eof).unwrap_or(true);
        if eof {
            // The client is gone (or the statement turned into COPY): the server's answers
            // are still in flight, so it is closed, and Python cleans the session up.
            self.give_back(shared, sid, true);
            if let Some(s) = self.sessions.get_mut(&id) {
                s.server = None;
                s.phase = Phase::Idle;
            }
            self.hand_back(shared, id, None, true);
            return;
        }
        if let Some(status) = finished {
            let server = self.servers.get_mut(&sid).unwrap();
            let session = self.sessions.get_mut(&id).unwrap();
            session.deadline = None;
            session.status = status;
            if status != b'I' {
                // The client's statement opened a transaction: Python runs the rest of it on
                // this server connection.
                session.phase = Phase::Idle;
                self.flush_client(shared, id);
                self.hand_back(shared, id, None, false);
                return;
            }
            server.session = None;
            session.server = None;
            session.phase = Phase::Idle;
            let pool_id = server.pool;
            let broken = server.broken || session.expired;
            session.expired = false;
            let hold = server.hold;
            let old = server.lent_at.elapsed() >= LENT_MAX;
            server.idle_since = Instant::now();
            if let Some(pool) = self.pools.get_mut(&pool_id) {
                pool.transactions += 1;
            }
            self.flush_client(shared, id);
            if broken || hold || old {
                self.give_back(shared, sid, broken);
            } else {
                self.release(shared, pool_id, sid);
            }
            // What it sent meanwhile is buffered (read on its events); the socket only if a
            // read stopped at the limit.
            if self.sessions.get(&id).is_some_and(|s| s.unread) {
                self.client_input(shared, id, false);
            } else {
                self.pump(shared, id);
            }
        } else {
            self.flush_client(shared, id);
        }
    }

    fn release(&mut self, shared: &Shared, pool_id: u64, sid: u64) {
        let pool = self.pools.entry(pool_id).or_default();
        if pool.reclaims > 0 {
            pool.reclaims -= 1;
            self.give_back(shared, sid, false);
            return;
        }
        if let Some(waiter) = pool.waiters.pop_front() {
            if let Some(s) = self.sessions.get_mut(&waiter) {
                s.phase = Phase::Active; // set properly by start
                self.start(shared, waiter, sid);
                return;
            }
        }
        pool.idle.push(sid);
    }

    fn flush_client(&mut self, shared: &Shared, id: u64) {
        let Some(session) = self.sessions.get_mut(&id) else { return };
        if session.out.is_empty() {
            return;
        }
        if write_some(session.fd, &mut session.out).is_err() {
            session.out.clear();
            session.eof = true;
            return;
        }
        watch_writes(shared, session.fd, token_of_session(id), &mut session.writable, !session.out.is_empty());
        // Its server was not read while the backlog was full.
        if session.out.len() < CLIENT_BACKLOG / 2 {
            if let Some(sid) = session.server {
                if let Some(server) = self.servers.get_mut(&sid) {
                    if server.paused {
                        server.paused = false;
                        self.server_input(shared, sid, false);
                    }
                }
            }
        } else if let Some(sid) = session.server {
            if let Some(server) = self.servers.get_mut(&sid) {
                server.paused = true;
            }
        }
    }

    /// The client's socket is readable (``closed``: its peer shut it down, said by the event:
    /// with the short-read rule no later read would tell).
    fn client_input(&mut self, shared: &Shared, id: u64, closed: bool) {
        let Some(session) = self.sessions.get_mut(&id) else { return };
        let limit = if session.phase == Phase::Idle { MAX_FAST_MESSAGE + 5 } else { CLIENT_AHEAD };
        let (gone, drained) = read_all(session.fd, &mut session.inbuf, limit);
        session.unread = !gone && !drained;
        if gone || closed {
            session.eof = true;
            if session.phase == Phase::Active || session.phase == Phase::Settings {
                if let Some(sid) = session.server.take() {
                    session.phase = Phase::Idle;
                    self.give_back(shared, sid, true);
                }
            }
        }
        self.pump(shared, id);
    }

    fn client_writable(&mut self, shared: &Shared, id: u64) {
        self.flush_client(shared, id);
        let gone = self.sessions.get(&id).map(|s| s.eof).unwrap_or(false);
        if gone {
            let sid = self.sessions.get_mut(&id).and_then(|s| s.server.take());
            if let Some(sid) = sid {
                self.give_back(shared, sid, true);
            }
            if let Some(s) = self.sessions.get_mut(&id) {
                s.phase = Phase::Idle;
            }
            self.hand_back(shared, id, None, true);
        }
    }

    fn timers(&mut self, shared: &Shared) -> Option<Duration> {
        let now = Instant::now();
        let mut next: Option<Duration> = None;
        let mut expired = Vec::new();
        let sessions = &self.sessions;
        self.timed.retain(|id| {
            let Some(deadline) = sessions.get(id).and_then(|s| s.deadline) else {
                return false;
            };
            if deadline <= now {
                expired.push(*id);
                return false;
            }
            let left = deadline - now;
            next = Some(next.map_or(left, |n: Duration| n.min(left)));
            true
        });
        for id in expired {
            let Some(s) = self.sessions.get_mut(&id) else { continue };
            s.deadline = None;
            s.expired = true;
            let Some(sid) = s.server else { continue };
            let stalled = !s.out.is_empty();
            if let Some(server) = self.servers.get_mut(&sid) {
                server.broken = true; // never lent again; Python has it terminated
            }
            self.emit(shared, Event::Expired { session: id, server: sid });
            if stalled {
                // The client stopped taking its rows: the session ends, as on the Python path.
                let fd = self.sessions[&id].fd;
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
        }
        let mut old = Vec::new();
        for (&sid, server) in &self.servers {
            if server.session.is_none() && server.idle_since.elapsed() >= IDLE_RETURN {
                old.push(sid);
            }
        }
        for sid in old {
            self.give_back(shared, sid, false);
        }
        if !self.servers.is_empty() {
            next = Some(next.map_or(IDLE_RETURN, |n| n.min(IDLE_RETURN)));
        }
        next
    }
}

fn run(shared: Arc<Shared>, mut poll: Poll) {
    let mut events = Events::with_capacity(1024);
    let mut timeout: Option<Duration> = None;
    loop {
        if poll.poll(&mut events, timeout).is_err() {
            continue;
        }
        let mut state = lock(&shared);
        if state.stop {
            return;
        }
        let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            step(&shared, &mut state, &events)
        }));
        timeout = match step {
            Ok(next) => next,
            Err(_) => {
                // A bug of the relay's must not leave clients waiting on a dead thread: every
                // session goes back to Python (ended), every server back to its pool (closed).
                eprintln!("pgwire relay: a step failed; its sessions and servers go back");
                let sessions: Vec<u64> = state.sessions.keys().copied().collect();
                for id in sessions {
                    if let Some(s) = state.sessions.get_mut(&id) {
                        s.phase = Phase::Idle;
                        s.server = None;
                    }
                    state.hand_back(&shared, id, None, true);
                }
                let servers: Vec<u64> = state.servers.keys().copied().collect();
                for sid in servers {
                    state.give_back(&shared, sid, true);
                }
                None
            }
        };
    }
}

/// One turn of the relay's loop: Python's commands, then the sockets that are ready; the
/// time until the next timer.
fn step(shared: &Shared, state: &mut State, events: &Events) -> Option<Duration> {
    {
        let commands = std::mem::take(&mut state.commands);
        for command in commands {
            match command {
                Command::Pump(id) => {
                    state.client_input(shared, id, false);
                }
                Command::ReclaimIdle => {
                    // The service's connection budget is full and something waits for room:
                    // every idle server goes back (Python closes it for the waiter).
                    let idle: Vec<u64> = state.pools.values_mut().flat_map(|p| p.idle.drain(..)).collect();
                    for sid in idle {
                        state.give_back(shared, sid, false);
                    }
                }
                Command::Serve(pool_id) => {
                    // A server Python lent (or a reclaim): serve a waiter, else keep it idle.
                    loop {
                        let pool = state.pools.entry(pool_id).or_default();
                        if pool.reclaims == 0 || pool.idle.is_empty() {
                            break;
                        }
                        pool.reclaims -= 1;
                        let sid = pool.idle.pop().unwrap();
                        state.give_back(shared, sid, false);
                    }
                    loop {
                        let pool = state.pools.entry(pool_id).or_default();
                        if pool.waiters.is_empty() || pool.idle.is_empty() {
                            break;
                        }
                        let waiter = pool.waiters.pop_front().unwrap();
                        let sid = pool.idle.pop().unwrap();
                        if state.sessions.contains_key(&waiter) {
                            state.start(shared, waiter, sid);
                        } else {
                            state.pools.get_mut(&pool_id).unwrap().idle.push(sid);
                        }
                    }
                }
            }
        }
        for event in events.iter() {
            let token = event.token();
            if token == WAKER {
                continue;
            }
            let n = token.0 as u64;
            if n.is_multiple_of(2) {
                let id = (n - 2) / 2;
                if event.is_writable() {
                    state.client_writable(shared, id);
                }
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    state.client_input(shared, id, event.is_read_closed() || event.is_error());
                }
            } else {
                let sid = (n - 3) / 2;
                if event.is_writable() {
                    state.flush_server(shared, sid);
                }
                state.server_input(shared, sid, event.is_read_closed() || event.is_error());
            }
        }
        state.timers(shared)
    }
}

/// The relay: one thread, started by ``Plane(notify_fd)``.
#[pyclass]
struct Plane {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

fn bytes<'py>(py: Python<'py>, data: &[u8]) -> Bound<'py, PyBytes> {
    PyBytes::new(py, data)
}

#[pymethods]
impl Plane {
    #[new]
    fn new(notify_fd: i32) -> PyResult<Self> {
        let poll = Poll::new().map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        let registry = poll.registry().try_clone().map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        let waker = Waker::new(poll.registry(), WAKER).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                sessions: HashMap::new(),
                servers: HashMap::new(),
                pools: HashMap::new(),
                shapes: HashMap::new(),
                shape_count: 0,
                events: Vec::new(),
                done: HashMap::new(),
                commands: Vec::new(),
                timed: HashSet::new(),
                signaled: false,
                stop: false,
            }),
            registry,
            waker,
            notify: notify_fd,
        });
        let for_thread = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("pgwire-relay".into())
            .spawn(move || run(for_thread, poll))
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        Ok(Plane { shared, thread: Some(thread) })
    }

    /// Take a client's socket while its session is idle; ``buffered``: what Python read and
    /// has not handled yet. ``wanted``: (name, value, SET statement) of its settings.
    #[allow(clippy::too_many_arguments)]
    fn delegate(
        &self,
        py: Python<'_>,
        session: u64,
        fd: i32,
        pool: u64,
        class: u64,
        buffered: Vec<u8>,
        wanted: Vec<(String, String, String)>,
        limit_ms: u64,
        margin_ms: u64,
        pool_max: usize,
        statements: Vec<AllowedStatement>,
    ) -> PyResult<()> {
        py.detach(|| {
            let mut state = lock(&self.shared);
            let entry = Session {
                fd,
                pool,
                class,
                inbuf: buffered,
                out: Vec::new(),
                wanted,
                limit: Duration::from_millis(limit_ms + margin_ms),
                phase: Phase::Idle,
                server: None,
                message: Vec::new(),
                statement: None,
                swallow_parse: false,
                statements: statements
                    .into_iter()
                    .map(|(name, server_name, parse, verdict, sql)| (name, Statement { server_name, parse, verdict, sql }))
                    .collect(),
                verdict: 0,
                started: Instant::now(),
                deadline: None,
                expired: false,
                reported: false,
                ran: false,
                writable: false,
                eof: false,
                unread: false,
                status: b'I',
                limit_ms,
                pool_max,
            };
            self.shared
                .registry
                .register(&mut SourceFd(&fd), token_of_session(session), Interest::READABLE)
                .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
            state.sessions.insert(session, entry);
            state.commands.push(Command::Pump(session));
            drop(state);
            self.shared.waker.wake().map_err(|e| PyRuntimeError::new_err(e.to_string()))
        })
    }

    /// Take a session back now (Python closes it, or it is cancelled): its server, if it had
    /// one, comes back broken (events). True if the relay still had it.
    fn recall(&self, py: Python<'_>, session: u64) -> bool {
        py.detach(|| {
            let mut state = lock(&self.shared);
            let Some(mut s) = state.sessions.remove(&session) else { return false };
            let _ = self.shared.registry.deregister(&mut SourceFd(&s.fd));
            if let Some(pool) = state.pools.get_mut(&s.pool) {
                pool.waiters.retain(|&w| w != session);
            }
            if let Some(sid) = s.server.take() {
                if let Some(server) = state.servers.get_mut(&sid) {
                    server.session = None;
                }
                state.give_back(&self.shared, sid, true);
            }
            true
        })
    }

    /// Lend an idle server connection of pool ``pool``; ``applied``: its settings.
    #[allow(clippy::too_many_arguments)]
    fn lend(
        &self,
        py: Python<'_>,
        pool: u64,
        server: u64,
        fd: i32,
        applied: Vec<(String, String)>,
        prepared: Vec<Vec<u8>>,
        prepared_bytes: usize,
        prepared_max: usize,
    ) -> PyResult<()> {
        py.detach(|| {
            let mut state = lock(&self.shared);
            self.shared
                .registry
                .register(&mut SourceFd(&fd), token_of_server(server), Interest::READABLE)
                .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
            let now = Instant::now();
            state.servers.insert(
                server,
                Server {
                    fd,
                    pool,
                    applied: applied.into_iter().collect(),
                    inbuf: Vec::new(),
                    out: Vec::new(),
                    session: None,
                    broken: false,
                    hold: false,
                    idle_since: now,
                    lent_at: now,
                    paused: false,
                    setting_error: false,
                    prepared: prepared.into_iter().collect(),
                    prepared_bytes,
                    prepared_max,
                    writable: false,
                },
            );
            let p = state.pools.entry(pool).or_default();
            p.requested = p.requested.saturating_sub(1);
            p.idle.push(server);
            state.commands.push(Command::Serve(pool));
            drop(state);
            self.shared.waker.wake().map_err(|e| PyRuntimeError::new_err(e.to_string()))
        })
    }

    /// Python could not lend a server for pool ``pool``: its first waiter goes back to Python
    /// (which answers it as its own path does: waits, or refuses with the pool's error).
    fn unavailable(&self, py: Python<'_>, pool: u64) {
        py.detach(|| {
            let mut state = lock(&self.shared);
            let p = state.pools.entry(pool).or_default();
            p.requested = p.requested.saturating_sub(1);
            if let Some(waiter) = p.waiters.pop_front() {
                state.hand_back(&self.shared, waiter, None, false); // Waiting: its message with it
            }
        })
    }

    /// Python's pool has a waiter: give back one server of ``pool`` (idle now, or the next
    /// to finish its transaction).
    fn reclaim(&self, py: Python<'_>, pool: u64) -> PyResult<()> {
        py.detach(|| {
            let mut state = lock(&self.shared);
            if !state.servers.values().any(|s| s.pool == pool) {
                return Ok(());
            }
            state.pools.entry(pool).or_default().reclaims += 1;
            state.commands.push(Command::Serve(pool));
            drop(state);
            self.shared.waker.wake().map_err(|e| PyRuntimeError::new_err(e.to_string()))
        })
    }

    /// The server running session ``session``'s statement now, held (never lent again here:
    /// a cancel is on its way to it), or None.
    fn serving(&self, py: Python<'_>, session: u64) -> Option<u64> {
        py.detach(|| {
            let mut state = lock(&self.shared);
            let sid = state.sessions.get(&session)?.server?;
            state.servers.get_mut(&sid)?.hold = true;
            Some(sid)
        })
    }

    /// The server connections the relay holds now: (server, the session whose statement runs
    /// on it or None, seconds since it went idle or 0.0) — the admin view's rows.
    fn held(&self, py: Python<'_>) -> Vec<(u64, Option<u64>, f64)> {
        py.detach(|| {
            let state = lock(&self.shared);
            state
                .servers
                .iter()
                .map(|(&sid, s)| {
                    let idle = if s.session.is_some() { 0.0 } else { s.idle_since.elapsed().as_secs_f64() };
                    (sid, s.session, idle)
                })
                .collect()
        })
    }

    /// The service's connection budget has a waiter: give back every server idle here now
    /// (those running a statement stay until it ends, as Python's own would).
    fn reclaim_idle(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let mut state = lock(&self.shared);
            if !state.pools.values().any(|p| !p.idle.is_empty()) {
                return Ok(());
            }
            state.commands.push(Command::ReclaimIdle);
            drop(state);
            self.shared.waker.wake().map_err(|e| PyRuntimeError::new_err(e.to_string()))
        })
    }

    /// Let the relay run texts of this shape for sessions of ``class`` (``verdict``: Python's
    /// index of the guard's verdict).
    fn allow(&self, py: Python<'_>, class: u64, key: Vec<u8>, verdict: u32) {
        py.detach(|| {
            let mut state = lock(&self.shared);
            if state.shape_count >= SHAPES_MAX {
                state.shapes.clear();
                state.shape_count = 0;
            }
            if state.shapes.entry(class).or_default().insert(key, verdict).is_none() {
                state.shape_count += 1;
            }
        })
    }

    /// Forget every shape allowed for ``class`` (None: for every class).
    #[pyo3(signature = (class=None))]
    fn forget(&self, py: Python<'_>, class: Option<u64>) {
        py.detach(|| {
            let mut state = lock(&self.shared);
            match class {
                Some(c) => {
                    let gone = state.shapes.remove(&c).map_or(0, |m| m.len());
                    state.shape_count -= gone;
                }
                None => {
                    state.shapes.clear();
                    state.shape_count = 0;
                }
            }
        })
    }

    fn counts(&self, py: Python<'_>) -> (usize, usize, usize) {
        py.detach(|| {
            let state = lock(&self.shared);
            (state.sessions.len(), state.servers.len(), state.shape_count)
        })
    }

    /// Everything that happened since the last call, in order, as tuples (see pgwire/relay.py).
    fn take(&self, py: Python<'_>) -> PyResult<Vec<Py<PyTuple>>> {
        let (events, counts, done) = py.detach(|| {
            let mut state = lock(&self.shared);
            state.signaled = false;
            let events = std::mem::take(&mut state.events);
            let done = std::mem::take(&mut state.done);
            let mut counts = Vec::new();
            for (&id, pool) in state.pools.iter_mut() {
                if pool.transactions > 0 || pool.queries > 0 {
                    counts.push(Event::Count { pool: id, transactions: pool.transactions, queries: pool.queries });
                    pool.transactions = 0;
                    pool.queries = 0;
                }
            }
            (events, counts, done)
        });
        let mut out = Vec::with_capacity(done.len() + events.len() + counts.len());
        for ((session, verdict, command), group) in done {
            let tuple = (
                "done",
                session,
                verdict,
                bytes(py, &command),
                bytes(py, &group.micros),
                group.rows,
                bytes(py, &group.sql),
            )
                .into_pyobject(py)?;
            out.push(tuple.unbind());
        }
        for event in events.into_iter().chain(counts) {
            let tuple = match event {
                Event::Returned {
                    session,
                    leftover,
                    pending,
                    key,
                    normalized,
                    ran,
                    server,
                    status,
                    close,
                    wanted,
                    applied,
                    prepared,
                    prepared_bytes,
                } => (
                    "returned",
                    session,
                    bytes(py, &leftover),
                    bytes(py, &pending),
                    key.map(|k| bytes(py, &k).unbind()),
                    normalized.map(|n| bytes(py, &n).unbind()),
                    ran,
                    server,
                    bytes(py, &[status]),
                    close,
                    wanted,
                    (applied, prepared.iter().map(|p| bytes(py, p)).collect::<Vec<_>>(), prepared_bytes),
                )
                    .into_pyobject(py)?,
                Event::Failed { session, verdict, sqlstate, message } => {
                    ("failed", session, verdict, sqlstate, message).into_pyobject(py)?
                }
                Event::Setting { server, name, value } => ("setting", server, name, value).into_pyobject(py)?,
                Event::Need { pool } => ("need", pool).into_pyobject(py)?,
                Event::Back { server, broken, applied, prepared, prepared_bytes } => {
                    let prepared: Vec<Bound<'_, PyBytes>> = prepared.iter().map(|p| bytes(py, p)).collect();
                    ("back", server, broken, applied, prepared, prepared_bytes).into_pyobject(py)?
                }
                Event::Expired { session, server } => ("expired", session, server).into_pyobject(py)?,
                Event::Count { pool, transactions, queries } => ("count", pool, transactions, queries).into_pyobject(py)?,
            };
            out.push(tuple.unbind());
        }
        Ok(out)
    }

    /// Stop the relay's thread (Python then owns every socket again; it closes them).
    fn close(&mut self, py: Python<'_>) {
        {
            let mut state = lock(&self.shared);
            state.stop = true;
        }
        let _ = self.shared.waker.wake();
        if let Some(thread) = self.thread.take() {
            py.detach(|| {
                let _ = thread.join();
            });
        }
    }
}

/// A statement's shape (see shape.rs): (normalised text, kinds of its constants), or None.
#[pyfunction]
fn shape_of<'py>(py: Python<'py>, text: &[u8]) -> Option<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    shape::shape(text).map(|(n, k)| (bytes(py, &n), bytes(py, &k)))
}

#[pymodule]
fn dbsvc_wire(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Plane>()?;
    m.add_class::<front::Front>()?;
    m.add_function(wrap_pyfunction!(shape_of, m)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![kind];
        out.extend_from_slice(&((payload.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn statements() -> HashMap<Vec<u8>, Statement> {
        let mut map = HashMap::new();
        map.insert(
            b"P_0".to_vec(),
            Statement {
                server_name: b"dbsvc_abc".to_vec(),
                parse: message(b'P', b"dbsvc_abc\0SELECT $1\0\0\0"),
                verdict: 7,
                sql: b"SELECT $1".to_vec(),
            },
        );
        map
    }

    fn bind(portal: &[u8], name: &[u8]) -> Vec<u8> {
        let mut payload = portal.to_vec();
        payload.push(0);
        payload.extend_from_slice(name);
        payload.push(0);
        payload.extend_from_slice(b"\0\0\0\x01\0\0\0\x011\0\0");
        message(b'B', &payload)
    }

    #[test]
    fn a_bind_describe_execute_sync_batch_of_an_allowed_statement_runs() {
        let mut buf = bind(b"", b"P_0");
        buf.extend(message(b'D', b"P\0"));
        buf.extend(message(b'E', b"\0\0\0\0\0"));
        buf.extend(message(b'S', b""));
        match batch(&buf, &statements()) {
            Batch::Run { total, verdict, name } => {
                assert_eq!(total, buf.len());
                assert_eq!(verdict, 7);
                assert_eq!(name, b"P_0".to_vec());
            }
            _ => panic!("not run"),
        }
    }

    #[test]
    fn a_batch_waits_for_its_sync_and_leaves_anything_else_to_python() {
        let mut buf = bind(b"", b"P_0");
        buf.extend(message(b'E', b"\0\0\0\0\0"));
        assert!(matches!(batch(&buf, &statements()), Batch::More));
        let mut flush = buf.clone();
        flush.extend(message(b'H', b""));
        assert!(matches!(batch(&flush, &statements()), Batch::Other));
        for name in [&b"unknown"[..], b""] {
            let mut other = bind(b"", name);
            other.extend(message(b'E', b"\0\0\0\0\0"));
            other.extend(message(b'S', b""));
            assert!(matches!(batch(&other, &statements()), Batch::Other));
        }
        let mut other_portal = bind(b"p1", b"P_0");
        other_portal.extend(message(b'E', b"p2\0\0\0\0\0"));
        other_portal.extend(message(b'S', b""));
        assert!(matches!(batch(&other_portal, &statements()), Batch::Other));
    }
}
