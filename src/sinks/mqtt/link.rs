//! The broker connection: rumqttc's protocol state machine ([`MqttState`]) and packet
//! codec, driven by I/O of our own, in a task of its own.
//!
//! rumqttc's `EventLoop` writes and flushes each request on its own: a `writev` and a TCP
//! segment per publish, which the broker then reads one at a time. Here every request
//! already queued (room in the broker's receive window permitting) is encoded into one
//! buffer and written at once, the acknowledgements a read brings are answered in one
//! write too, and the events of a pass go to the publisher as one batch. The protocol
//! rules (packet ids, the in-flight window, pings, acknowledging incoming QoS 1) stay
//! rumqttc's: its state machine changes state without I/O, and this module only moves
//! its bytes.
//!
//! After a connection error the link waits for [`Link::resume`] before it reconnects,
//! so the publisher decides when; requests still queued then are dropped, so nothing the
//! publisher queued before it saw the error goes out on a connection it does not know
//! about (its tracker maps the n-th `Outgoing::Publish` event to the n-th request it
//! queued since the last CONNACK).

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::StateError;
use rumqttc::v5::mqttbytes;
use rumqttc::v5::mqttbytes::v5::{ConnAck, Connect, ConnectReturnCode, Packet};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions, MqttState, Request};
use rumqttc::{TlsConfiguration, Transport};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio::time::{Instant, timeout};

/// Event batches handed over at most before the link waits for the publisher
/// (back-pressure: it then stops reading the socket). A batch holds one event or more,
/// so the publisher's window (512 publishes and their acknowledgements) always fits.
const BATCHES_CAP: usize = 1024;
/// Bytes of requests encoded before they are written (a write, not a limit on packets).
const WRITE_CHUNK: usize = 256 * 1024;
/// Read buffer reserved per read (as tokio-util's framing does).
const READ_CHUNK: usize = 8 * 1024;

type Batch = Result<Vec<Event>, ConnectionError>;

/// The publisher's end of a broker connection: the events in order, and the resume
/// switch. Stops when dropped.
pub struct Link {
    rx: mpsc::Receiver<Batch>,
    /// Events of the last batch not taken yet.
    buffered: VecDeque<Event>,
    resume: Arc<Notify>,
    /// Options (another broker) for the next connection, taken on resume.
    next: Arc<Mutex<Option<MqttOptions>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Link {
    /// Start connecting with `options`; the client queues requests (at most `cap`).
    pub fn start(options: MqttOptions, cap: usize) -> (AsyncClient, Link) {
        let (req_tx, req_rx) = flume::bounded(cap);
        let (tx, rx) = mpsc::channel(BATCHES_CAP);
        let resume = Arc::new(Notify::new());
        let next: Arc<Mutex<Option<MqttOptions>>> = Arc::default();
        let task = tokio::spawn(run(options, req_rx, tx, resume.clone(), next.clone()));
        let link = Link {
            rx,
            buffered: VecDeque::new(),
            resume,
            next,
            task,
        };
        (AsyncClient::from_senders(req_tx), link)
    }

    /// The next event, in order; an error means the connection was lost (call
    /// [`Link::resume`] to reconnect).
    pub async fn next(&mut self) -> Result<Event, ConnectionError> {
        loop {
            if let Some(ev) = self.buffered.pop_front() {
                return Ok(ev);
            }
            match self.rx.recv().await {
                Some(Ok(evs)) => self.buffered.extend(evs),
                Some(Err(e)) => return Err(e),
                // the task ended (panicked): report it as a lost connection
                None => return Err(ConnectionError::RequestsDone),
            }
        }
    }

    /// An event that is already there.
    pub fn try_next(&mut self) -> Option<Result<Event, ConnectionError>> {
        loop {
            if let Some(ev) = self.buffered.pop_front() {
                return Some(Ok(ev));
            }
            match self.rx.try_recv() {
                Ok(Ok(evs)) => self.buffered.extend(evs),
                Ok(Err(e)) => return Some(Err(e)),
                Err(_) => return None,
            }
        }
    }

    /// Connect again after an error.
    pub fn resume(&self) {
        self.resume.notify_one();
    }

    /// Connect again after an error, with `options` (another broker).
    pub fn resume_with(&self, options: MqttOptions) {
        if let Ok(mut g) = self.next.lock() {
            *g = Some(options);
        }
        self.resume.notify_one();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connections, one after another, until the publisher is gone.
async fn run(
    mut options: MqttOptions,
    requests: flume::Receiver<Request>,
    tx: mpsc::Sender<Batch>,
    resume: Arc<Notify>,
    next: Arc<Mutex<Option<MqttOptions>>>,
) {
    loop {
        let e = session(&options, &requests, &tx).await;
        if tx.send(Err(e)).await.is_err() {
            return;
        }
        resume.notified().await;
        // Queued after the error, before the publisher handled it: counted lost there.
        drop(requests.drain());
        if let Some(o) = next.lock().ok().and_then(|mut g| g.take()) {
            options = o;
        }
    }
}

/// One connection, until it fails (the error is returned).
async fn session(
    options: &MqttOptions,
    requests: &flume::Receiver<Request>,
    tx: &mpsc::Sender<Batch>,
) -> ConnectionError {
    let wait = Duration::from_secs(options.connection_timeout());
    let (host, port) = options.broker_address();
    let tcp = match timeout(wait, TcpStream::connect((host.as_str(), port))).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return e.into(),
        Err(e) => return e.into(),
    };
    // small publishes must not wait for Nagle's algorithm (see conn::options)
    if let Err(e) = tcp.set_nodelay(true) {
        return e.into();
    }
    match options.transport() {
        Transport::Tls(TlsConfiguration::Rustls(cfg)) => {
            let name = match rustls_pki_types::ServerName::try_from(host.clone()) {
                Ok(n) => n,
                Err(e) => return io::Error::new(io::ErrorKind::InvalidInput, e).into(),
            };
            let connector = tokio_rustls::TlsConnector::from(cfg);
            match timeout(wait, connector.connect(name, tcp)).await {
                Ok(Ok(s)) => drive(s, options, requests, tx, wait).await,
                Ok(Err(e)) => e.into(),
                Err(e) => e.into(),
            }
        }
        Transport::Tcp => drive(tcp, options, requests, tx, wait).await,
        _ => io::Error::new(
            io::ErrorKind::Unsupported,
            "only mqtt:// and mqtts:// (rustls) transports are supported",
        )
        .into(),
    }
}

/// CONNECT, then requests out and packets in until an error.
async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    options: &MqttOptions,
    requests: &flume::Receiver<Request>,
    tx: &mpsc::Sender<Batch>,
    wait: Duration,
) -> ConnectionError {
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    let mut wbuf = BytesMut::with_capacity(READ_CHUNK);
    let max_in = options.max_packet_size();
    let connack = match timeout(wait, handshake(&mut io, options, &mut rbuf, &mut wbuf)).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return e,
        Err(e) => return e.into(),
    };
    let props = connack.properties.as_ref();
    let max_out = props.and_then(|p| p.max_packet_size);
    // the broker's Server Keep Alive, where it sends one, replaces ours
    let keep_alive = props
        .and_then(|p| p.server_keep_alive)
        .map_or(options.keep_alive(), |k| Duration::from_secs(u64::from(k)));
    let upper = options
        .get_outgoing_inflight_upper_limit()
        .unwrap_or(u16::MAX);
    // The state machine applies the broker's receive maximum to its packet ids; the same
    // bound decides when to take more requests.
    let window = props
        .and_then(|p| p.receive_max)
        .unwrap_or(u16::MAX)
        .min(upper);
    let mut state = MqttState::new(upper, false);
    if let Err(e) = state.handle_incoming_packet(Packet::ConnAck(connack)) {
        return e.into();
    }
    // A zero keep-alive (ours or the broker's) means no pings at all.
    let pinging = !keep_alive.is_zero();
    let ping = tokio::time::sleep(keep_alive);
    tokio::pin!(ping);
    loop {
        // The pass's bytes, then its events (the CONNACK's first). A publish's `Outgoing`
        // event still reaches the publisher before its acknowledgement can: that is read
        // by this task, in a later pass.
        if !wbuf.is_empty() {
            match timeout(wait, io.write_all(&wbuf)).await {
                Ok(Ok(())) => wbuf.clear(),
                Ok(Err(e)) => return e.into(),
                Err(e) => return e.into(),
            }
        }
        if !hand_over(&mut state, tx).await {
            return ConnectionError::RequestsDone;
        }
        let room = state.inflight() < window && state.collision.is_none();
        let step: Result<(), ConnectionError> = tokio::select! {
            r = requests.recv_async(), if room => match r {
                Ok(req) => {
                    let mut res = outgoing(&mut state, req, &mut wbuf, max_out);
                    // Everything else already queued, room permitting: one write.
                    while res.is_ok()
                        && state.inflight() < window
                        && state.collision.is_none()
                        && wbuf.len() < WRITE_CHUNK
                    {
                        match requests.try_recv() {
                            Ok(req) => res = outgoing(&mut state, req, &mut wbuf, max_out),
                            Err(_) => break,
                        }
                    }
                    res
                }
                Err(_) => Err(ConnectionError::RequestsDone),
            },
            r = read_some(&mut io, &mut rbuf) => match r {
                Ok(()) => incoming(&mut state, &mut rbuf, &mut wbuf, max_in, max_out),
                Err(e) => Err(e),
            },
            _ = &mut ping, if pinging => {
                ping.as_mut().reset(Instant::now() + keep_alive);
                outgoing(&mut state, Request::PingReq, &mut wbuf, max_out)
            }
        };
        if let Err(e) = step {
            // what the state machine saw before the error still goes to the publisher
            hand_over(&mut state, tx).await;
            return e;
        }
    }
}

/// The state machine's events so far, as one batch; false when the publisher is gone.
async fn hand_over(state: &mut MqttState, tx: &mpsc::Sender<Batch>) -> bool {
    if state.events.is_empty() {
        return true;
    }
    let evs: Vec<Event> = state.events.drain(..).collect();
    tx.send(Ok(evs)).await.is_ok()
}

/// Sends CONNECT and waits for a successful CONNACK.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    options: &MqttOptions,
    rbuf: &mut BytesMut,
    wbuf: &mut BytesMut,
) -> Result<ConnAck, ConnectionError> {
    let connect = Packet::Connect(
        Connect {
            client_id: options.client_id(),
            keep_alive: u16::try_from(options.keep_alive().as_secs()).unwrap_or(u16::MAX),
            clean_start: options.clean_start(),
            properties: options.connect_properties(),
        },
        options.last_will(),
        options.credentials(),
    );
    connect
        .write(wbuf, None)
        .map_err(StateError::Deserialization)?;
    io.write_all(wbuf).await?;
    wbuf.clear();
    loop {
        match Packet::read(rbuf, options.max_packet_size()) {
            Ok(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => return Ok(ack),
            Ok(Packet::ConnAck(ack)) => return Err(ConnectionError::ConnectionRefused(ack.code)),
            Ok(p) => return Err(ConnectionError::NotConnAck(Box::new(p))),
            Err(mqttbytes::Error::InsufficientBytes(_)) => read_some(io, rbuf).await?,
            Err(e) => return Err(StateError::Deserialization(e).into()),
        }
    }
}

/// Reads what the socket has (at least one byte); end of stream is an error.
async fn read_some<S: AsyncRead + Unpin>(
    io: &mut S,
    rbuf: &mut BytesMut,
) -> Result<(), ConnectionError> {
    rbuf.reserve(READ_CHUNK);
    match io.read_buf(rbuf).await {
        Ok(0) => Err(StateError::ConnectionAborted.into()),
        Ok(_) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A request through the state machine, its packet (if any) into `wbuf`.
fn outgoing(
    state: &mut MqttState,
    req: Request,
    wbuf: &mut BytesMut,
    max_out: Option<u32>,
) -> Result<(), ConnectionError> {
    // rumqttc's state machine has no arm for the packets only a broker sends
    if matches!(
        req,
        Request::PubComp(_) | Request::PingResp | Request::SubAck(_) | Request::UnsubAck(_)
    ) {
        return Ok(());
    }
    if let Some(p) = state.handle_outgoing_packet(req)? {
        p.write(wbuf, max_out)
            .map_err(StateError::Deserialization)?;
    }
    Ok(())
}

/// Every whole packet in `rbuf` through the state machine; the replies it makes (PUBACKs
/// of incoming QoS 1 publishes) into `wbuf`.
fn incoming(
    state: &mut MqttState,
    rbuf: &mut BytesMut,
    wbuf: &mut BytesMut,
    max_in: Option<u32>,
    max_out: Option<u32>,
) -> Result<(), ConnectionError> {
    loop {
        match Packet::read(rbuf, max_in) {
            Ok(p) => {
                if let Some(out) = state.handle_incoming_packet(p)? {
                    out.write(wbuf, max_out)
                        .map_err(StateError::Deserialization)?;
                }
            }
            Err(mqttbytes::Error::InsufficientBytes(_)) => return Ok(()),
            Err(e) => return Err(StateError::Deserialization(e).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::Outgoing;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{ConnAckProperties, PubAck};
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};
    use tokio::io::{DuplexStream, ReadBuf};

    /// The link's end of an in-memory connection, counting the writes made on it (a
    /// broker's end reads whatever is buffered at once, so one read cannot tell one
    /// write from twenty).
    struct Counted {
        io: DuplexStream,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let r = Pin::new(&mut self.io).poll_write(cx, buf);
            if matches!(r, Poll::Ready(Ok(_))) {
                self.writes.fetch_add(1, Ordering::SeqCst);
            }
            r
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// The packets one read brings the broker's end (at least one).
    async fn read_packets(peer: &mut DuplexStream, buf: &mut BytesMut) -> Vec<Packet> {
        let mut out = Vec::new();
        while out.is_empty() {
            read_some(peer, buf).await.expect("the link's bytes");
            loop {
                match Packet::read(buf, None) {
                    Ok(p) => out.push(p),
                    Err(mqttbytes::Error::InsufficientBytes(_)) => break,
                    Err(e) => panic!("bad packet: {e:?}"),
                }
            }
        }
        out
    }

    fn publishes(ps: &[Packet]) -> Vec<u16> {
        ps.iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some(p.pkid),
                _ => None,
            })
            .collect()
    }

    /// CONNACK properties with nothing set.
    fn props() -> ConnAckProperties {
        ConnAckProperties {
            session_expiry_interval: None,
            receive_max: None,
            max_qos: None,
            retain_available: None,
            max_packet_size: None,
            assigned_client_identifier: None,
            topic_alias_max: None,
            reason_string: None,
            user_properties: Vec::new(),
            wildcard_subscription_available: None,
            subscription_identifiers_available: None,
            shared_subscription_available: None,
            server_keep_alive: None,
            response_information: None,
            server_reference: None,
            authentication_method: None,
            authentication_data: None,
        }
    }

    async fn write(peer: &mut DuplexStream, ps: &[Packet]) {
        let mut b = BytesMut::new();
        for p in ps {
            p.write(&mut b, None).unwrap();
        }
        peer.write_all(&b).await.unwrap();
    }

    /// Requests queued while the broker's window is full leave in one write when it
    /// opens, not a write each; the events come in order (each publish before its
    /// acknowledgement), and the window is never exceeded.
    #[tokio::test]
    async fn queued_publishes_leave_in_one_write_per_window() {
        let (ours, mut peer) = tokio::io::duplex(1 << 20);
        let writes = Arc::new(AtomicUsize::new(0));
        let ours = Counted {
            io: ours,
            writes: writes.clone(),
        };
        let (req_tx, req_rx) = flume::bounded(64);
        let client = AsyncClient::from_senders(req_tx);
        for i in 0..50 {
            client
                .try_publish(format!("t/{i}"), QoS::AtLeastOnce, true, "x")
                .unwrap();
        }
        let (tx, mut rx) = mpsc::channel(BATCHES_CAP);
        let mut opts = MqttOptions::new("link-unit", "localhost", 1883);
        opts.set_outgoing_inflight_upper_limit(512);
        let task =
            tokio::spawn(
                async move { drive(ours, &opts, &req_rx, &tx, Duration::from_secs(5)).await },
            );
        let mut buf = BytesMut::new();
        let first = read_packets(&mut peer, &mut buf).await;
        assert!(matches!(first[..], [Packet::Connect(..)]), "{first:?}");
        let props = ConnAckProperties {
            receive_max: Some(20),
            ..props()
        };
        let connack = ConnAck {
            session_present: false,
            code: ConnectReturnCode::Success,
            properties: Some(props),
        };
        write(&mut peer, &[Packet::ConnAck(connack)]).await;
        // The whole window, in one write (the CONNECT was the first).
        let w1 = publishes(&read_packets(&mut peer, &mut buf).await);
        assert_eq!(w1.len(), 20, "{w1:?}");
        assert_eq!(writes.load(Ordering::SeqCst), 2, "writes so far");
        // Acknowledged in one write: the next 20 come in one write again.
        let acks = |ids: &[u16]| -> Vec<Packet> {
            ids.iter()
                .map(|&id| Packet::PubAck(PubAck::new(id, None)))
                .collect()
        };
        write(&mut peer, &acks(&w1)).await;
        let w2 = publishes(&read_packets(&mut peer, &mut buf).await);
        assert_eq!(w2.len(), 20, "{w2:?}");
        assert_eq!(writes.load(Ordering::SeqCst), 3, "writes so far");
        write(&mut peer, &acks(&w2)).await;
        let w3 = publishes(&read_packets(&mut peer, &mut buf).await);
        assert_eq!(w3.len(), 10, "the rest: {w3:?}");
        assert_eq!(writes.load(Ordering::SeqCst), 4, "writes so far");
        // The publisher sees CONNACK, then every publish before its acknowledgement.
        let mut events = Vec::new();
        while events.len() < 1 + 50 + 40 {
            events.extend(rx.recv().await.unwrap().unwrap());
        }
        assert!(matches!(events[0], Event::Incoming(Packet::ConnAck(_))));
        let mut out = std::collections::HashSet::new();
        let mut sent = 0;
        for ev in &events[1..] {
            match ev {
                Event::Outgoing(Outgoing::Publish(id)) => {
                    assert!(out.insert(*id), "pkid {id} reused while in flight");
                    assert!(out.len() <= 20, "window exceeded");
                    sent += 1;
                }
                Event::Incoming(Packet::PubAck(a)) => assert!(out.remove(&a.pkid)),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(sent, 50);
        drop(peer);
        let e = task.await.unwrap();
        assert!(
            matches!(e, ConnectionError::MqttState(StateError::ConnectionAborted)),
            "{e}"
        );
    }

    /// A 5 s keep-alive pings every 5 s of idle time; a broker that answers with a
    /// Server Keep Alive of 0 (MQTT 5: no keep-alive) gets no pings, where a timer of zero
    /// would fire on every pass.
    #[tokio::test(start_paused = true)]
    async fn pings_follow_the_keep_alive_and_none_when_the_broker_sets_zero() {
        for (server, want) in [(None, 2usize), (Some(0u16), 0)] {
            let (ours, mut peer) = tokio::io::duplex(1 << 16);
            let (_req_tx, req_rx) = flume::bounded::<Request>(4);
            let (tx, _rx) = mpsc::channel(BATCHES_CAP);
            let mut opts = MqttOptions::new("link-unit", "localhost", 1883);
            opts.set_keep_alive(Duration::from_secs(5));
            let task = tokio::spawn(async move {
                drive(ours, &opts, &req_rx, &tx, Duration::from_secs(60)).await
            });
            let mut buf = BytesMut::new();
            read_packets(&mut peer, &mut buf).await;
            let connack = ConnAck {
                session_present: false,
                code: ConnectReturnCode::Success,
                properties: server.map(|k| ConnAckProperties {
                    server_keep_alive: Some(k),
                    ..props()
                }),
            };
            write(&mut peer, &[Packet::ConnAck(connack)]).await;
            // 12 s of idle (paused) time: count the pings, answering each
            let mut pings = 0;
            let until = Instant::now() + Duration::from_secs(12);
            while let Ok(ps) =
                tokio::time::timeout_at(until, read_packets(&mut peer, &mut buf)).await
            {
                for p in ps {
                    assert!(matches!(p, Packet::PingReq(_)), "{p:?}");
                    pings += 1;
                    write(
                        &mut peer,
                        &[Packet::PingResp(rumqttc::v5::mqttbytes::v5::PingResp)],
                    )
                    .await;
                }
            }
            assert_eq!(pings, want, "server keep-alive {server:?}");
            task.abort();
        }
    }

    /// A broker that refuses the CONNECT is an error naming the reason.
    #[tokio::test]
    async fn a_refused_connect_is_an_error() {
        let (ours, mut peer) = tokio::io::duplex(1 << 16);
        let (_req_tx, req_rx) = flume::bounded::<Request>(4);
        let (tx, _rx) = mpsc::channel(BATCHES_CAP);
        let opts = MqttOptions::new("link-unit", "localhost", 1883);
        let task =
            tokio::spawn(
                async move { drive(ours, &opts, &req_rx, &tx, Duration::from_secs(5)).await },
            );
        let mut buf = BytesMut::new();
        read_packets(&mut peer, &mut buf).await;
        let refused = ConnAck {
            session_present: false,
            code: ConnectReturnCode::NotAuthorized,
            properties: None,
        };
        write(&mut peer, &[Packet::ConnAck(refused)]).await;
        let e = task.await.unwrap();
        assert!(
            matches!(
                e,
                ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized)
            ),
            "{e}"
        );
    }
}
