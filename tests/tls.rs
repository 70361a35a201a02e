//! End-to-end: `amqps://`. A TLS-terminating proxy (rustls, a test CA) stands in front of the
//! local broker; workers and submitters trust the CA through SSL_CERT_FILE, as with any
//! private CA, and refuse the connection without it.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::{ServerConfig, crypto::ring};

const MINUTE: Duration = Duration::from_secs(60);

/// Starts the TLS front; returns its port and the CA certificate file.
async fn tls_front(dir: &Path) -> (u16, PathBuf) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Warren test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();

    let config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone(), ca_cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(client).await else {
                    return;
                };
                let Ok(mut broker) = TcpStream::connect("127.0.0.1:5672").await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
            });
        }
    });
    (port, ca_file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_submitters_speak_amqps() {
    let queue = unique_queue("tls");
    let dir = scratch("tls");
    let (port, ca) = tls_front(&dir).await;
    let url = format!("amqps://guest:guest@127.0.0.1:{port}/{TEST_VHOST}");
    let ca = ca.to_str().unwrap();
    let env = [("WARREN_AMQP_URL", url.as_str()), ("SSL_CERT_FILE", ca)];
    let worker = WorkerProcess::start_with(&queue, &dir, &[], &env);
    worker.wait_for_log("consuming", 1, MINUTE).await;
    assert!(
        worker
            .log_text()
            .contains(&format!("amqps://guest:***@127.0.0.1:{port}"))
    );

    let mut submit = warren();
    submit.envs(env).args([
        "submit",
        "--create-queue",
        "--queue",
        &queue,
        "--wait",
        "exec",
        "--",
        "true",
    ]);
    let out = tokio::time::timeout(MINUTE, submit.output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // This worker has no exec handler: its `unknown_kind` answer proves the round trip over TLS.
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let results = read_results(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(results[0]["error"]["kind"], "unknown_kind", "{results:?}");
    delete_queues(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_refused_with_a_clear_error() {
    let dir = scratch("tlsbad");
    let (port, _ca) = tls_front(&dir).await;
    let mut submit = warren();
    submit
        .env(
            "WARREN_AMQP_URL",
            format!("amqps://guest:guest@127.0.0.1:{port}/{TEST_VHOST}"),
        )
        .env_remove("SSL_CERT_FILE")
        .args([
            "submit",
            "--create-queue",
            "--retry-for",
            "1",
            "exec",
            "--",
            "true",
        ]);
    let out = tokio::time::timeout(MINUTE, submit.output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("amqps://guest:***@127.0.0.1:{port}")),
        "{stderr}"
    );
    assert!(
        stderr.contains("certificate this machine does not trust"),
        "names the certificate problem: {stderr}"
    );
    assert!(
        stderr.contains("SSL_CERT_FILE"),
        "says what to do: {stderr}"
    );
}
