//! The gRPC port's front: HTTP/2 on a thread of its own (tokio's current-thread runtime, h2).
//!
//! grpcio's asyncio server costs more CPU per call than our whole handler of a cached read,
//! and as much again in latency at one call at a time. The front owns the public port instead:
//!
//! - a call to one of the *fast* methods Python names (the unary methods of our services:
//!   `DatabaseService/Query`, the query path, first among them) is read whole here and handed to Python as (metadata, request bytes, peer, deadline); Python
//!   runs the servicer's own method and answers with the response bytes, or a status, and the
//!   trailing metadata; the front writes them (trailers-only for a status, as grpcio does);
//! - every other call, and a fast one that is not plain (compressed, several messages, not
//!   `application/grpc`), is relayed frame by frame, flow control passed on, to Python's
//!   grpcio server on a private Unix socket: one backend connection per client connection,
//!   so grpcio's per-connection limits keep their meaning. The client's address goes with it
//!   as `x-dbsvc-peer` (one sent by the client is dropped).
//!
//! Nothing here decides anything about a caller: authentication, tenancy, the guard, limits and
//! bookkeeping are Python's, for fast calls as for relayed ones. The front enforces what
//! grpcio would at the transport: the received and sent message limits, the concurrent-stream
//! cap, the deadline (`grpc-timeout`: DEADLINE_EXCEEDED, and Python's task is cancelled, as it
//! is when the client resets the stream), keepalive pings, and a graceful GOAWAY at shutdown.
//!
//! Threads: the front's thread never takes the GIL. A call for Python is queued under a mutex
//! and, when the queue was empty, an eventfd Python watches is written; Python drains the queue
//! (`take`) on its loop and answers (`answer`) through a oneshot channel the call waits on.

use std::collections::HashMap;
use std::future::poll_fn;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString, PyTuple};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::{oneshot, watch, Mutex as AsyncMutex};
use tokio::time::Instant;

const PEER_HEADER: &str = "x-dbsvc-peer";
// Receive windows: a client streaming a bulk insert, or a 1,000,000-row stream coming back from
// grpcio, is not held to HTTP/2's 64 KiB default.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const PING_TIMEOUT: Duration = Duration::from_secs(10);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);
// Metadata kept by grpcio out of `invocation_metadata()` (transport headers).
const NOT_METADATA: [&str; 6] = ["content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding", PEER_HEADER];

/// A fast call for Python.
struct Call {
    id: u64,
    method: usize,
    metadata: Vec<(String, Vec<u8>, bool)>, // key, value, binary (a `-bin` key, base64 decoded)
    message: Bytes,
    peer: String,
    timeout: f64, // seconds; negative: none
}

/// Python's answer to a fast call.
struct Answer {
    status: u32,
    message: String,
    payload: Option<Vec<u8>>,
    trailers: Vec<(String, Vec<u8>)>, // already as header values (`-bin` ones base64 encoded)
}

impl Answer {
    fn status(status: u32, message: &str) -> Self {
        Answer { status, message: message.to_string(), payload: None, trailers: Vec::new() }
    }
}

#[derive(Default)]
struct Queue {
    calls: Vec<Call>,
    cancelled: Vec<u64>,
}

struct Shared {
    queue: Mutex<Queue>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
    notify: RawFd,
    next: AtomicU64,
    connections: AtomicUsize,
    fast: AtomicU64,
    relayed: AtomicU64,
}

impl Shared {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a live u64 to an eventfd Python keeps open while we run.
        unsafe {
            libc::write(self.notify, &one as *const u64 as *const libc::c_void, 8);
        }
    }

    fn push(&self, call: Call) {
        let was_empty = {
            let mut q = self.queue.lock().unwrap();
            let empty = q.calls.is_empty() && q.cancelled.is_empty();
            q.calls.push(call);
            empty
        };
        if was_empty {
            self.wake();
        }
    }

    fn cancel(&self, id: u64) {
        if self.pending.lock().unwrap().remove(&id).is_none() {
            return; // answered meanwhile
        }
        let was_empty = {
            let mut q = self.queue.lock().unwrap();
            // Not taken by Python yet: never run it.
            if let Some(at) = q.calls.iter().position(|c| c.id == id) {
                q.calls.remove(at);
                return;
            }
            let empty = q.calls.is_empty() && q.cancelled.is_empty();
            q.cancelled.push(id);
            empty
        };
        if was_empty {
            self.wake();
        }
    }
}

struct Config {
    fast: HashMap<String, usize>,
    backend: String,
    max_receive: usize,
    max_send: usize,
    max_streams: u32,
    keepalive: Duration,
}

/// grpcio's `peer()` format: `ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000`.
fn peer_of(address: &std::net::SocketAddr) -> String {
    match address {
        std::net::SocketAddr::V4(a) => format!("ipv4:{}:{}", a.ip(), a.port()),
        std::net::SocketAddr::V6(a) => format!("ipv6:[{}]:{}", a.ip(), a.port()),
    }
}

/// `grpc-timeout` (`100m`, `5S`, ...) in seconds.
fn timeout_of(value: &[u8]) -> Option<f64> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: f64 = std::str::from_utf8(digits).ok()?.parse::<u64>().ok()? as f64;
    let scale = match unit[0] {
        b'H' => 3600.0,
        b'M' => 60.0,
        b'S' => 1.0,
        b'm' => 1e-3,
        b'u' => 1e-6,
        b'n' => 1e-9,
        _ => return None,
    };
    Some(n * scale)
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let emit = chunk.len() + 1;
        for i in 0..4 {
            if i < emit {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize]);
            } else {
                out.push(b'=');
            }
        }
    }
    out
}

fn base64_decode(data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in data {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// grpc-message: percent-encoded outside printable ASCII (and `%` itself).
fn percent_encode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for &b in text.as_bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

fn metadata_of(headers: &HeaderMap) -> Vec<(String, Vec<u8>, bool)> {
    let mut out = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        let key = name.as_str();
        if NOT_METADATA.contains(&key) {
            continue;
        }
        if key.ends_with("-bin") {
            if let Some(decoded) = base64_decode(value.as_bytes()) {
                out.push((key.to_string(), decoded, true));
            }
        } else {
            out.push((key.to_string(), value.as_bytes().to_vec(), false));
        }
    }
    out
}

fn grpc_response() -> Response<()> {
    let mut response = Response::new(());
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

fn status_headers(headers: &mut HeaderMap, status: u32, message: &str, trailers: &[(String, Vec<u8>)]) {
    headers.insert("grpc-status", HeaderValue::from(status));
    if !message.is_empty() {
        if let Ok(value) = HeaderValue::from_bytes(&percent_encode(message)) {
            headers.insert("grpc-message", value);
        }
    }
    for (key, value) in trailers {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(key.as_bytes()), HeaderValue::from_bytes(value)) {
            headers.append(name, value);
        }
    }
}

/// A status with no message: one HEADERS frame that ends the stream, as grpcio sends it.
fn trailers_only(respond: &mut SendResponse<Bytes>, status: u32, message: &str, trailers: &[(String, Vec<u8>)]) {
    let mut response = grpc_response();
    status_headers(response.headers_mut(), status, message, trailers);
    let _ = respond.send_response(response, true);
}

fn write_answer(respond: &mut SendResponse<Bytes>, answer: Answer, max_send: usize) {
    let payload = match answer.payload {
        Some(p) if answer.status == 0 => p,
        _ => return trailers_only(respond, answer.status, &answer.message, &answer.trailers),
    };
    if payload.len() > max_send {
        let text = format!("Sent message larger than max ({} vs. {})", payload.len(), max_send);
        return trailers_only(respond, 8, &text, &[]);
    }
    let Ok(mut send) = respond.send_response(grpc_response(), false) else { return };
    let mut data = BytesMut::with_capacity(5 + payload.len());
    data.put_u8(0);
    data.put_u32(payload.len() as u32);
    data.put_slice(&payload);
    // One message, bounded by max_send: h2 keeps what the window does not take yet.
    if send.send_data(data.freeze(), false).is_err() {
        return;
    }
    let mut trailers = HeaderMap::new();
    status_headers(&mut trailers, 0, "", &answer.trailers);
    let _ = send.send_trailers(trailers);
}

/// Send `data` as the peer's window allows (so a slow reader holds its sender back).
async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), h2::Error> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Err(e),
            None => return Err(h2::Error::from(h2::Reason::CANCEL)),
        };
        if granted == 0 {
            continue;
        }
        let chunk = data.split_to(granted.min(data.len()));
        send.send_data(chunk, false)?;
    }
    Ok(())
}

/// Python's grpcio server, reached over one HTTP/2 connection per client connection.
struct Backend {
    path: String,
    sender: AsyncMutex<Option<h2::client::SendRequest<Bytes>>>,
}

impl Backend {
    async fn ready(&self) -> Option<h2::client::SendRequest<Bytes>> {
        let mut held = self.sender.lock().await;
        if let Some(sender) = held.as_ref() {
            if let Ok(ready) = sender.clone().ready().await {
                return Some(ready);
            }
            *held = None; // that connection is gone: a new one
        }
        let io = UnixStream::connect(&self.path).await.ok()?;
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(io)
            .await
            .ok()?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        *held = Some(sender.clone());
        sender.ready().await.ok()
    }
}

/// Client → backend: the request's messages (any already read first), then its end.
async fn pump_up(body: Option<RecvStream>, buffered: Option<Bytes>, mut up: SendStream<Bytes>) {
    if let Some(data) = buffered {
        if send_all(&mut up, data).await.is_err() {
            return;
        }
    }
    let Some(mut body) = body else {
        let _ = up.send_data(Bytes::new(), true);
        return;
    };
    loop {
        match body.data().await {
            Some(Ok(chunk)) => {
                let n = chunk.len();
                if send_all(&mut up, chunk).await.is_err() {
                    return;
                }
                let _ = body.flow_control().release_capacity(n);
            }
            Some(Err(_)) => {
                up.send_reset(h2::Reason::CANCEL);
                return;
            }
            None => break,
        }
    }
    match body.trailers().await {
        Ok(Some(trailers)) => {
            let _ = up.send_trailers(trailers);
        }
        Ok(None) => {
            let _ = up.send_data(Bytes::new(), true);
        }
        Err(_) => up.send_reset(h2::Reason::CANCEL),
    }
}

/// A call relayed to grpcio; `buffered`: its body, when the front read it already.
async fn relay(
    backend: Arc<Backend>,
    peer: String,
    mut parts: http::request::Parts,
    body: Option<RecvStream>,
    buffered: Option<Bytes>,
    mut respond: SendResponse<Bytes>,
) {
    let Some(mut sender) = backend.ready().await else {
        return trailers_only(&mut respond, 14, "the service's gRPC server is not reachable", &[]);
    };
    parts.headers.remove(PEER_HEADER);
    if let Ok(value) = HeaderValue::from_str(&peer) {
        parts.headers.insert(PEER_HEADER, value);
    }
    let ends = buffered.is_none() && body.as_ref().is_none_or(|b| b.is_end_stream());
    let request = Request::from_parts(parts, ());
    let (response, up) = match sender.send_request(request, ends) {
        Ok(pair) => pair,
        Err(_) => return trailers_only(&mut respond, 14, "the service's gRPC server is not reachable", &[]),
    };
    let pump = if ends { None } else { Some(tokio::spawn(pump_up(body, buffered, up))) };
    let stop_pump = |pump: &Option<tokio::task::JoinHandle<()>>| {
        if let Some(p) = pump {
            p.abort();
        }
    };
    let response = tokio::select! {
        r = response => r,
        _ = poll_fn(|cx| respond.poll_reset(cx)) => { stop_pump(&pump); return; }
    };
    let response = match response {
        Ok(r) => r,
        Err(e) => {
            stop_pump(&pump);
            if let Some(reason) = e.reason() {
                respond.send_reset(reason);
            }
            return;
        }
    };
    let (head, mut down) = response.into_parts();
    let ends = down.is_end_stream();
    let Ok(mut send) = respond.send_response(Response::from_parts(head, ()), ends) else {
        stop_pump(&pump);
        return;
    };
    if ends {
        return;
    }
    loop {
        tokio::select! {
            chunk = down.data() => match chunk {
                Some(Ok(chunk)) => {
                    let n = chunk.len();
                    if send_all(&mut send, chunk).await.is_err() {
                        stop_pump(&pump);
                        return; // the client went: dropping `down` resets the backend's stream
                    }
                    let _ = down.flow_control().release_capacity(n);
                }
                Some(Err(e)) => {
                    send.send_reset(e.reason().unwrap_or(h2::Reason::INTERNAL_ERROR));
                    stop_pump(&pump);
                    return;
                }
                None => break,
            },
            _ = poll_fn(|cx| send.poll_reset(cx)) => { stop_pump(&pump); return; }
        }
    }
    match down.trailers().await {
        Ok(Some(trailers)) => {
            let _ = send.send_trailers(trailers);
        }
        Ok(None) => {
            let _ = send.send_data(Bytes::new(), true);
        }
        Err(e) => send.send_reset(e.reason().unwrap_or(h2::Reason::INTERNAL_ERROR)),
    }
}

fn plain_grpc(parts: &http::request::Parts) -> bool {
    let headers = &parts.headers;
    parts.method == http::Method::POST
        && headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes() == b"application/grpc" || v.as_bytes() == b"application/grpc+proto")
        && headers.get("grpc-encoding").is_none_or(|v| v.as_bytes() == b"identity")
}

/// A call to a fast method: read whole, answered by Python.
#[allow(clippy::too_many_arguments)]
async fn fast_call(
    shared: Arc<Shared>,
    config: Arc<Config>,
    backend: Arc<Backend>,
    peer: String,
    method: usize,
    parts: http::request::Parts,
    mut body: RecvStream,
    mut respond: SendResponse<Bytes>,
) {
    let mut buf = BytesMut::new();
    let limit = config.max_receive + 5;
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { return }; // reset by the client
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
        if buf.len() > limit {
            let length = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
            let text = format!("Received message larger than max ({} vs. {})", length, config.max_receive);
            return trailers_only(&mut respond, 8, &text, &[]);
        }
    }
    let length = if buf.len() >= 5 { u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize } else { 0 };
    if buf.len() < 5 || buf[0] != 0 || buf.len() != 5 + length {
        // Not one uncompressed message: grpcio says what is wrong with it.
        shared.relayed.fetch_add(1, Ordering::Relaxed);
        return relay(backend, peer, parts, None, Some(buf.freeze()), respond).await;
    }
    if length > config.max_receive {
        let text = format!("Received message larger than max ({} vs. {})", length, config.max_receive);
        return trailers_only(&mut respond, 8, &text, &[]);
    }
    let timeout = parts.headers.get("grpc-timeout").and_then(|v| timeout_of(v.as_bytes()));
    let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.min(1e9)));
    let id = shared.next.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = oneshot::channel();
    shared.pending.lock().unwrap().insert(id, tx);
    shared.fast.fetch_add(1, Ordering::Relaxed);
    shared.push(Call {
        id,
        method,
        metadata: metadata_of(&parts.headers),
        message: buf.freeze().slice(5..),
        peer,
        timeout: timeout.unwrap_or(-1.0),
    });
    let expired = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    let answer = tokio::select! {
        answer = rx => answer.unwrap_or_else(|_| Answer::status(1, "Cancelled")),
        _ = expired => {
            shared.cancel(id);
            Answer::status(4, "Deadline Exceeded")
        }
        _ = poll_fn(|cx| respond.poll_reset(cx)) => {
            shared.cancel(id);
            return;
        }
    };
    write_answer(&mut respond, answer, config.max_send);
}

async fn stream(
    shared: Arc<Shared>,
    config: Arc<Config>,
    backend: Arc<Backend>,
    peer: String,
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
) {
    let (parts, body) = request.into_parts();
    if let Some(&method) = config.fast.get(parts.uri.path()) {
        if plain_grpc(&parts) {
            return fast_call(shared, config, backend, peer, method, parts, body, respond).await;
        }
    }
    shared.relayed.fetch_add(1, Ordering::Relaxed);
    relay(backend, peer, parts, Some(body), None, respond).await
}

async fn connection(
    shared: Arc<Shared>,
    config: Arc<Config>,
    socket: TcpStream,
    peer: String,
    mut stop: watch::Receiver<bool>,
) {
    let _ = socket.set_nodelay(true);
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(config.max_streams)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(16 << 10);
    // A client that never completes the handshake holds a socket at most this long (grpcio's
    // server handshake timeout is 120 s).
    let handshake = tokio::select! {
        h = tokio::time::timeout(HANDSHAKE_TIMEOUT, builder.handshake::<_, Bytes>(socket)) => h,
        _ = stop.changed() => return,
    };
    let Ok(Ok(mut conn)) = handshake else { return };
    let backend = Arc::new(Backend { path: config.backend.clone(), sender: AsyncMutex::new(None) });
    // Keepalive: a ping every `keepalive`; no answer within PING_TIMEOUT closes the connection.
    let (dead_tx, mut dead) = oneshot::channel::<()>();
    let pinger = conn.ping_pong().map(|mut pings| {
        let every = config.keepalive;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match tokio::time::timeout(PING_TIMEOUT, pings.ping(h2::Ping::opaque())).await {
                    Ok(Ok(_)) => {}
                    _ => {
                        let _ = dead_tx.send(());
                        return;
                    }
                }
            }
        })
    });
    let mut stopping = *stop.borrow();
    if stopping {
        conn.graceful_shutdown();
    }
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    tokio::spawn(stream(
                        Arc::clone(&shared),
                        Arc::clone(&config),
                        Arc::clone(&backend),
                        peer.clone(),
                        request,
                        respond,
                    ));
                }
                _ => break,
            },
            changed = stop.changed(), if !stopping => {
                if changed.is_err() || *stop.borrow() {
                    stopping = true;
                    conn.graceful_shutdown();
                }
            }
            _ = &mut dead, if pinger.is_some() => break,
        }
    }
    if let Some(p) = pinger {
        p.abort();
    }
}

async fn accept(shared: Arc<Shared>, config: Arc<Config>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((socket, address)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await; // EMFILE and the like
                    continue;
                };
                let shared = Arc::clone(&shared);
                let config = Arc::clone(&config);
                let stop = stop.clone();
                shared.connections.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    connection(Arc::clone(&shared), config, socket, peer_of(&address), stop).await;
                    shared.connections.fetch_sub(1, Ordering::Relaxed);
                });
            }
            _ = stop.changed() => return, // the listening socket closes here
        }
    }
}

#[pyclass]
pub struct Front {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    abort: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

#[pymethods]
impl Front {
    /// Serve the listening sockets `fds` (owned from here on); `fast`: the methods answered by
    /// Python through `take`/`answer` (by their paths, `/package.Service/Method`); `backend`:
    /// the Unix socket of grpcio's server for everything else.
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        fds: Vec<i32>,
        notify_fd: i32,
        fast: Vec<String>,
        backend: String,
        max_receive: usize,
        max_send: usize,
        max_streams: u32,
        keepalive_ms: u64,
    ) -> PyResult<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            pending: Mutex::new(HashMap::new()),
            notify: notify_fd,
            next: AtomicU64::new(1),
            connections: AtomicUsize::new(0),
            fast: AtomicU64::new(0),
            relayed: AtomicU64::new(0),
        });
        let config = Arc::new(Config {
            fast: fast.into_iter().enumerate().map(|(i, path)| (path, i)).collect(),
            backend,
            max_receive,
            max_send,
            max_streams,
            keepalive: Duration::from_millis(keepalive_ms.max(1)),
        });
        let mut listeners = Vec::new();
        for fd in fds {
            // SAFETY: Python detached these sockets and hands them over.
            let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
            listener.set_nonblocking(true).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
            listeners.push(listener);
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        let (stop, stopped) = watch::channel(false);
        let (abort, aborted) = oneshot::channel::<()>();
        let for_thread = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("grpc-front".into())
            .spawn(move || {
                runtime.block_on(async move {
                    for listener in listeners {
                        match TcpListener::from_std(listener) {
                            Ok(l) => {
                                tokio::spawn(accept(Arc::clone(&for_thread), Arc::clone(&config), l, stopped.clone()));
                            }
                            Err(e) => eprintln!("grpc front: {e}"),
                        }
                    }
                    let _ = aborted.await; // then every task is dropped with the runtime
                });
            })
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        Ok(Front { shared, stop, abort: Some(abort), thread: Some(thread) })
    }

    /// Calls for Python since the last take: ([(id, method, metadata, request, peer,
    /// timeout)], [id of a call to cancel]).
    #[allow(clippy::type_complexity)]
    fn take<'py>(&self, py: Python<'py>) -> PyResult<(Vec<Bound<'py, PyTuple>>, Vec<u64>)> {
        let queue = std::mem::take(&mut *self.shared.queue.lock().unwrap());
        let mut calls = Vec::with_capacity(queue.calls.len());
        for call in queue.calls {
            let mut metadata = Vec::with_capacity(call.metadata.len());
            for (key, value, binary) in call.metadata {
                let value: Bound<'py, PyAny> = if binary {
                    PyBytes::new(py, &value).into_any()
                } else {
                    PyString::new(py, &String::from_utf8_lossy(&value)).into_any()
                };
                metadata.push((key, value).into_pyobject(py)?);
            }
            let metadata = PyTuple::new(py, metadata)?;
            calls.push(
                (call.id, call.method, metadata, PyBytes::new(py, &call.message), call.peer, call.timeout)
                    .into_pyobject(py)?,
            );
        }
        Ok((calls, queue.cancelled))
    }

    /// The answer to call `id`: `payload` (the response message) with status 0, else `status`
    /// and `message`; `trailers`: trailing metadata, (key, str | bytes).
    #[pyo3(signature = (id, status, message, payload, trailers))]
    fn answer(
        &self,
        id: u64,
        status: u32,
        message: String,
        payload: Option<Vec<u8>>,
        trailers: Vec<(String, Bound<'_, PyAny>)>,
    ) -> PyResult<()> {
        let mut values = Vec::with_capacity(trailers.len());
        for (key, value) in trailers {
            let key = key.to_ascii_lowercase();
            let value = if let Ok(b) = value.cast::<PyBytes>() {
                if key.ends_with("-bin") { base64_encode(b.as_bytes()) } else { b.as_bytes().to_vec() }
            } else {
                let text: String = value.extract()?;
                if key.ends_with("-bin") { base64_encode(text.as_bytes()) } else { text.into_bytes() }
            };
            values.push((key, value));
        }
        if let Some(waiting) = self.shared.pending.lock().unwrap().remove(&id) {
            let _ = waiting.send(Answer { status, message, payload, trailers: values });
        }
        Ok(())
    }

    /// Stop taking connections and send GOAWAY on each: calls in flight go on.
    fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// (open connections, fast calls, relayed calls) so far.
    fn counts(&self) -> (usize, u64, u64) {
        (
            self.shared.connections.load(Ordering::Relaxed),
            self.shared.fast.load(Ordering::Relaxed),
            self.shared.relayed.load(Ordering::Relaxed),
        )
    }

    /// End the thread: connections still open are dropped.
    fn close(&mut self, py: Python<'_>) {
        let _ = self.stop.send(true);
        if let Some(abort) = self.abort.take() {
            let _ = abort.send(());
        }
        if let Some(thread) = self.thread.take() {
            py.detach(|| {
                let _ = thread.join();
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_read_in_every_unit() {
        assert_eq!(timeout_of(b"100m"), Some(0.1));
        assert_eq!(timeout_of(b"5S"), Some(5.0));
        assert_eq!(timeout_of(b"2M"), Some(120.0));
        assert_eq!(timeout_of(b"1H"), Some(3600.0));
        assert_eq!(timeout_of(b"7"), None);
        assert_eq!(timeout_of(b"12x"), None);
        assert_eq!(timeout_of(b"123456789S"), None); // more than 8 digits
    }

    #[test]
    fn binary_metadata_round_trips_through_base64() {
        for data in [&b""[..], b"a", b"ab", b"abc", b"\x00\xff\x10binary"] {
            assert_eq!(base64_decode(&base64_encode(data)).unwrap(), data);
        }
        assert_eq!(base64_decode(b"YWJj").unwrap(), b"abc"); // unpadded, as grpc sends it
        assert_eq!(base64_decode(b"not base64!"), None);
    }

    #[test]
    fn status_messages_are_percent_encoded() {
        assert_eq!(percent_encode("plain text"), b"plain text");
        assert_eq!(percent_encode("100%\n\u{e9}"), b"100%25%0A%C3%A9");
    }

    #[test]
    fn transport_headers_are_not_metadata() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/grpc"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert("x-dbsvc-peer", HeaderValue::from_static("ipv4:6.6.6.6:1"));
        headers.insert("x-tenant-id", HeaderValue::from_static("acme"));
        headers.insert("trace-bin", HeaderValue::from_static("AAE"));
        let metadata = metadata_of(&headers);
        assert_eq!(
            metadata,
            vec![("x-tenant-id".to_string(), b"acme".to_vec(), false), ("trace-bin".to_string(), vec![0, 1], true)]
        );
    }
}
