//! The SPIFFE Workload API (feature `workload-api`): nodes that take their X.509-SVID and trust
//! bundles from an agent's socket and follow their rotation.
//!
//! No SPIRE agent runs here. The agent is played by an in-test server of the Workload API's
//! `FetchX509SVID` call (the gRPC service and messages of SPIFFE's `workload.proto`, served by
//! tonic on a Unix socket, as SPIRE serves them), handing out real SVIDs made by our `pki`
//! module and rotating them when the test says so. The client side is the library's, unchanged:
//! the `spiffe` crate's X.509 source inside `quicseal::workload_api`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use quicseal::pki::{Issued, NodeCert};
use quicseal::rustls::pki_types::pem::PemObject;
use quicseal::rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use quicseal::workload_api::WorkloadApi;
use quicseal::{Error, Node, NodeConfig};
use tokio::sync::watch;

use crate::common::{Pki, bind, connect, eventually, receive_in_order, refusal, to_identity, trickle};

// The messages of SPIFFE's workload.proto that FetchX509SVID carries, field for field.

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct X509SvidRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct X509SvidResponse {
    #[prost(message, repeated, tag = "1")]
    svids: Vec<X509Svid>,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    crl: Vec<Bytes>,
    #[prost(map = "string, bytes", tag = "3")]
    federated_bundles: HashMap<String, Bytes>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct X509Svid {
    #[prost(string, tag = "1")]
    spiffe_id: String,
    #[prost(bytes = "bytes", tag = "2")]
    x509_svid: Bytes,
    #[prost(bytes = "bytes", tag = "3")]
    x509_svid_key: Bytes,
    #[prost(bytes = "bytes", tag = "4")]
    bundle: Bytes,
    #[prost(string, tag = "5")]
    hint: String,
}

/// DER certificates, concatenated, as the Workload API carries chains and bundles.
fn der_of(pem: &str) -> Bytes {
    let mut out = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        out.extend_from_slice(&cert.unwrap());
    }
    out.into()
}

/// What an agent serves a workload: `issued` as its SVID for `id`, the CAs of `bundle` as its
/// own trust domain's bundle, and federated bundles (trust domain, CAs).
pub(crate) fn response(id: &str, issued: &Issued, bundle: &[&Pki], federated: &[(&str, &[&Pki])]) -> X509SvidResponse {
    let cas = |pkis: &[&Pki]| pkis.iter().flat_map(|p| der_of(p.ca.cert_pem()).to_vec()).collect::<Vec<u8>>().into();
    let key = PrivatePkcs8KeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    X509SvidResponse {
        svids: vec![X509Svid {
            spiffe_id: id.into(),
            // The leaf first, as the API requires (our chain PEM is the leaf alone).
            x509_svid: der_of(&issued.chain_pem),
            x509_svid_key: key.secret_pkcs8_der().to_vec().into(),
            bundle: cas(bundle),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: federated.iter().map(|(domain, pkis)| (format!("spiffe://{domain}"), cas(pkis))).collect(),
    }
}

/// An in-test SPIFFE Workload API server on a Unix socket, serving one workload: each
/// FetchX509SVID call streams the current answer, then every answer [`Agent::serve`] sets
/// (rotation). `None` answers as SPIRE does for a workload it has no entry for.
pub(crate) struct Agent {
    pub(crate) endpoint: String,
    answer: watch::Sender<Option<X509SvidResponse>>,
    calls: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Agent {
    pub(crate) fn start(dir: &Path, name: &str, first: Option<X509SvidResponse>) -> Agent {
        use futures_util::StreamExt;
        let socket = dir.join(format!("{name}.sock"));
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let (answer, _) = watch::channel(first);
        let calls = Arc::new(AtomicUsize::new(0));
        let (tx, counter) = (answer.clone(), calls.clone());
        let service = tower::service_fn(move |req: tonic::codegen::http::Request<tonic::body::Body>| {
            let (tx, counter) = (tx.clone(), counter.clone());
            async move {
                let fetch = tower::service_fn(move |request: tonic::Request<X509SvidRequest>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let rx = tx.subscribe();
                    async move {
                        // SPIRE refuses calls without the Workload API's security header.
                        if request.metadata().get("workload.spiffe.io").is_none_or(|v| v != "true") {
                            return Err(tonic::Status::invalid_argument("security header missing from request"));
                        }
                        let answers = tokio_stream::wrappers::WatchStream::new(rx)
                            .map(|answer| answer.ok_or_else(|| tonic::Status::permission_denied("no identity issued")));
                        Ok(tonic::Response::new(answers))
                    }
                });
                let path = req.uri().path().to_owned();
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok::<_, std::convert::Infallible>(match path.as_str() {
                    "/SpiffeWorkloadAPI/FetchX509SVID" => grpc.server_streaming(fetch, req).await.map(boxed),
                    _ => tonic::Status::unimplemented(path).into_http::<tonic::body::Body>(),
                })
            }
        });
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder().serve_with_incoming(service, incoming).await;
        });
        Agent { endpoint: format!("unix://{}", socket.display()), answer, calls, task }
    }

    /// FetchX509SVID calls so far.
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Serves `answer` from now on: streamed to every open call at once (a rotation).
    pub(crate) fn serve(&self, answer: Option<X509SvidResponse>) {
        self.answer.send_replace(answer);
    }

    async fn connect(&self) -> quicseal::Result<WorkloadApi> {
        WorkloadApi::connect_within(Some(&self.endpoint), Duration::from_secs(10)).await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn boxed<B>(body: B) -> tonic::body::Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tonic::body::Body::new(body)
}

/// Waits until `node` presents the certificate of `issued`: its follower took a rotation.
async fn presents(node: &Node, issued: &Issued, what: &str) {
    let want = to_identity(issued).fingerprint();
    eventually(&format!("{what}: the node presents the rotated SVID"), || node.identity().fingerprint() == want).await;
}

/// Two nodes take their SVIDs and bundles from their agents, dial each other by SPIFFE ID, and
/// follow three rotations while messages flow: two SVID rotations, and a CA rotation (the new
/// CA joins the bundle first, then SVIDs signed by it arrive). Each new handshake presents and
/// accepts the new material; the session that was open carries on: nothing lost, nothing
/// twice, no reconnection.
#[tokio::test]
async fn nodes_take_svids_and_bundles_from_the_workload_api_and_follow_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, new_ca, other_ca) =
        (Pki::new("example.org CA 1"), Pki::new("example.org CA 2"), Pki::new("b.test CA"));
    let (a_id, b_id) = ("spiffe://example.org/ns/default/sa/node-a", "spiffe://example.org/ns/default/sa/node-b");
    let svid = |pki: &Pki, id: &str| pki.issue(&NodeCert::new("svid").uri(id));
    let fed: &[(&str, &[&Pki])] = &[("b.test", &[&other_ca])];
    let a_first = svid(&old_ca, a_id);
    let a_agent = Agent::start(dir.path(), "a", Some(response(a_id, &a_first, &[&old_ca], fed)));
    let mut b_svid = svid(&old_ca, b_id);
    let b_agent = Agent::start(dir.path(), "b", Some(response(b_id, &b_svid, &[&old_ca], &[])));

    let (a_api, b_api) = (a_agent.connect().await.unwrap(), b_agent.connect().await.unwrap());
    assert_eq!(a_api.spiffe_id().unwrap(), a_id);
    let (identity, trust) = a_api.material().unwrap();
    assert_eq!(identity.fingerprint(), to_identity(&a_first).fingerprint());
    assert_eq!(trust.bundle_domains(), ["b.test", "example.org"], "its own domain and the federated one");
    let a = bind(NodeConfig::new(identity, trust));
    let (identity, trust) = b_api.material().unwrap();
    let b = bind(NodeConfig::new(identity, trust));
    let (a_follows, b_follows) = (a.follow(&a_api), b.follow(&b_api));

    let (to_b, at_b) = connect(&a, &b, b_id).await;
    let (to_b, at_b) = (to_b.unwrap(), at_b.unwrap());
    assert_eq!(at_b.peer().spiffe_id(), Some(a_id));
    // Messages flow the whole time.
    let (sender, receiver) = (trickle(&to_b, Duration::from_millis(2)), receive_in_order(&at_b));

    let mut calls_after_first = (0, 0);
    for round in 1..=3 {
        // Messages flow between rotations, not just before and after.
        let mark = at_b.stats().messages_delivered;
        eventually("messages arrive between rotations", || at_b.stats().messages_delivered >= mark + 10).await;
        if round == 3 {
            // CA rotation: the new CA joins both bundles, and the nodes follow, before any
            // SVID signed by it is handed out.
            a_agent.serve(Some(response(a_id, &a_first, &[&old_ca, &new_ca], fed)));
            b_agent.serve(Some(response(b_id, &b_svid, &[&old_ca, &new_ca], &[])));
            let has_both = |node: &Node| node.trust().bundle("example.org").is_some_and(|cas| cas.len() == 2);
            eventually("the new CA reached both trust stores", || has_both(&a) && has_both(&b)).await;
        }
        let issuer = if round == 3 { &new_ca } else { &old_ca };
        b_svid = svid(issuer, b_id);
        let bundle: &[&Pki] = if round == 3 { &[&old_ca, &new_ca] } else { &[&old_ca] };
        b_agent.serve(Some(response(b_id, &b_svid, bundle, &[])));
        presents(&b, &b_svid, &format!("rotation {round}")).await;
        // A new handshake presents the new SVID, and A accepts it (in round 3, through the
        // bundle A followed).
        let fresh = connect(&a, &b, b_id).await.0.unwrap();
        assert_eq!(fresh.peer().fingerprint, to_identity(&b_svid).fingerprint(), "rotation {round}");
        fresh.close();
        if round == 1 {
            // Both followers have a streaming call open now (B's carried this rotation).
            calls_after_first = (a_agent.calls(), b_agent.calls());
        }
    }
    assert_eq!(b_follows.status().failures, 0, "{:?}", b_follows.status());
    assert_eq!(a_follows.status().failures, 0, "{:?}", a_follows.status());
    assert!(b_follows.status().reloads >= 4, "{:?}", b_follows.status());

    sender.abort();
    let _ = sender.await;
    let sent = to_b.stats().messages_sent;
    to_b.delivered(0).await.unwrap();
    assert_eq!(to_b.stats().reconnects, 0, "the session was never dropped");
    assert_eq!(at_b.stats().messages_delivered, sent);
    to_b.close();
    let received = tokio::time::timeout(Duration::from_secs(10), receiver).await.expect("the receiver ends").unwrap();
    assert_eq!(u64::from(received), sent, "each message once, in order");
    // The later rotations came down the streaming calls already open, not through new calls.
    assert_eq!((a_agent.calls(), b_agent.calls()), calls_after_first);
}

/// A peer whose SPIFFE ID is in a trust domain the agent gave no bundle for, or a certificate
/// without a SPIFFE ID, is refused: a node fed by the Workload API trusts bundles only.
#[tokio::test]
async fn a_workload_api_node_trusts_its_bundles_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, stranger) = (Pki::new("example.org CA"), Pki::new("c.test CA"));
    let id = "spiffe://example.org/server";
    let agent = Agent::start(dir.path(), "s", Some(response(id, &ca.issue(&NodeCert::new("s").uri(id)), &[&ca], &[])));
    let api = agent.connect().await.unwrap();
    let (identity, trust) = api.material().unwrap();
    let server = bind(NodeConfig::new(identity, trust));
    // A dialler from a trust domain without a bundle there.
    let c =
        bind(NodeConfig::new(to_identity(&stranger.issue(&NodeCert::new("c").uri("spiffe://c.test/c"))), ca.trust()));
    let text = refusal(connect(&c, &server, id).await.1.unwrap_err());
    assert!(text.contains("unknown issuer"), "c.test has no bundle at the server: {text}");
    // A dialler whose certificate the bundle's CA signed, but with no SPIFFE ID.
    let plain = bind(NodeConfig::new(ca.identity("plain"), ca.trust()));
    let text = refusal(connect(&plain, &server, id).await.1.unwrap_err());
    assert!(text.contains("unknown issuer"), "no SPIFFE ID: no bundle vouches for it: {text}");
    // The same dialler with an example.org SVID from that CA is accepted.
    let member =
        bind(NodeConfig::new(to_identity(&ca.issue(&NodeCert::new("m").uri("spiffe://example.org/m"))), ca.trust()));
    assert!(connect(&member, &server, id).await.1.is_ok());
}

/// Connecting fails with a clear error, in bounded time, when no agent answers, when the
/// agent has no SVID for this workload, or when the endpoint is not one.
#[tokio::test]
async fn connecting_without_a_usable_agent_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let quick = Duration::from_millis(500);
    // Nothing listens on the socket.
    let nobody = format!("unix://{}", dir.path().join("nobody.sock").display());
    let e = WorkloadApi::connect_within(Some(&nobody), quick).await.unwrap_err();
    assert!(matches!(e, Error::WorkloadApi(_)), "{e:?}");
    // An agent that has no identity for this workload.
    let agent = Agent::start(dir.path(), "none", None);
    let e = WorkloadApi::connect_within(Some(&agent.endpoint), quick).await.unwrap_err();
    assert!(matches!(e, Error::WorkloadApi(_)), "{e:?}");
    assert!(agent.calls() >= 1, "the agent was asked");
    // Not an endpoint.
    for bad in ["/var/run/agent.sock", "http://127.0.0.1:1", "unix://"] {
        let e = WorkloadApi::connect_within(Some(bad), quick).await.unwrap_err();
        assert!(matches!(e, Error::WorkloadApi(_)), "{bad}: {e:?}");
    }
}

/// An agent serving `id` an SVID from `ca`, and a node built from what it served, following it.
struct Served {
    agent: Agent,
    api: WorkloadApi,
    first: Issued,
    server: Node,
    follower: quicseal::CertWatcher,
}

async fn served(dir: &Path, ca: &Pki, id: &str) -> Served {
    let first = ca.issue(&NodeCert::new("s").uri(id));
    let agent = Agent::start(dir, "s", Some(response(id, &first, &[ca], &[])));
    let api = agent.connect().await.unwrap();
    let (identity, trust) = api.material().unwrap();
    let server = bind(NodeConfig::new(identity, trust));
    let follower = server.follow(&api);
    Served { agent, api, first, server, follower }
}

/// An agent that withdraws the SVID, or rotates to one that cannot be used, leaves the node on
/// its last good material: it keeps accepting with it. The next good SVID is followed.
#[tokio::test]
async fn unusable_rotations_leave_the_node_on_its_last_good_svid() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, other) = (Pki::new("example.org CA"), Pki::new("other CA"));
    let id = "spiffe://example.org/server";
    let Served { agent, api: _api, first, server, follower } = served(dir.path(), &ca, id).await;
    let client =
        bind(NodeConfig::new(to_identity(&ca.issue(&NodeCert::new("c").uri("spiffe://example.org/c"))), ca.trust()));

    let first = to_identity(&first).fingerprint();
    let presented = async || connect(&client, &server, id).await.0.unwrap().peer().fingerprint;

    // The agent withdraws the SVID: the node keeps its own.
    agent.serve(None);
    eventually("the withdrawal was seen", || follower.status().failures == 1).await;
    assert!(follower.status().last_error.unwrap().contains("no usable SVID"), "{:?}", follower.status());
    assert_eq!(presented().await, first);
    // An SVID whose key is another certificate's: refused, the node keeps its own.
    let mut mismatched = response(id, &ca.issue(&NodeCert::new("s").uri(id)), &[&ca], &[]);
    let other_key = response(id, &other.issue(&NodeCert::new("x").uri(id)), &[&other], &[]);
    mismatched.svids[0].x509_svid_key = other_key.svids[0].x509_svid_key.clone();
    agent.serve(Some(mismatched));
    eventually("the mismatched SVID was seen", || follower.status().failures == 2).await;
    assert!(follower.status().last_error.unwrap().contains("key"), "{:?}", follower.status());
    assert_eq!(presented().await, first);
    // The next good SVID is followed.
    let good = ca.issue(&NodeCert::new("s").uri(id));
    agent.serve(Some(response(id, &good, &[&ca], &[])));
    presents(&server, &good, "the good SVID after the bad ones").await;
    assert_eq!(presented().await, to_identity(&good).fingerprint());
    assert!(follower.status().last_error.is_none(), "{:?}", follower.status());
}

/// Closing the connection to the agent stops its followers, which say why; the source then
/// hands out nothing, and the node keeps running on the SVID it has.
#[tokio::test]
async fn closing_the_workload_api_stops_following_and_the_node_keeps_its_svid() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Pki::new("example.org CA");
    let id = "spiffe://example.org/server";
    let Served { agent: _agent, api, first, server, follower } = served(dir.path(), &ca, id).await;
    api.close().await;
    eventually("the follower says the source was closed", || {
        follower.status().last_error.is_some_and(|e| e.contains("closed"))
    })
    .await;
    assert!(matches!(api.material(), Err(Error::WorkloadApi(_))));
    assert!(matches!(api.spiffe_id(), Err(Error::WorkloadApi(_))));
    let client =
        bind(NodeConfig::new(to_identity(&ca.issue(&NodeCert::new("c").uri("spiffe://example.org/c"))), ca.trust()));
    let session = connect(&client, &server, id).await.0.unwrap();
    assert_eq!(session.peer().fingerprint, to_identity(&first).fingerprint());
}
