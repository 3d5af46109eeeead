//! A client of the endpoint's HTTPS API as a script would use it: a session per user,
//! calls answered with their status and body.

use std::sync::Arc;

use reqwest::{Client, Method, RequestBuilder, StatusCode};
use serde_json::Value;

use crate::{Cloud, Pki, DEMO_PASSWORD};

/// The header vSphere's REST API carries its session in.
pub const SESSION: &str = "vmware-api-session-id";

#[derive(Debug)]
pub struct Rest {
    http: Client,
    base: String,
}

/// TLS settings of a client that trusts the test CA (rustls with ring, as the endpoint).
pub fn tls_config(pki: &Pki) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.cert_der()).expect("the test CA");
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// An HTTPS client builder trusting the test CA, for tests that add to it (a source
/// address, a timeout) before building.
pub fn client_builder(pki: &Pki) -> reqwest::ClientBuilder {
    Client::builder().tls_backend_preconfigured(tls_config(pki))
}

/// An HTTPS client trusting the test CA.
pub fn https_client(pki: &Pki) -> Client {
    client_builder(pki).build().expect("an HTTP client")
}

impl Rest {
    /// A client of `cloud`'s API (started with one), trusting the test CA.
    pub fn new(cloud: &Cloud, pki: &Pki) -> Rest {
        Rest {
            http: https_client(pki),
            base: format!("https://{}", cloud.api_addr.expect("the cloud runs its API")),
        }
    }

    /// A client of the API at `base` (`https://127.0.0.1:8443`), trusting the test CA:
    /// an endpoint this test did not start itself (a container's published port).
    pub fn at(base: &str, pki: &Pki) -> Rest {
        Rest {
            http: https_client(pki),
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    /// A request to `path` (`/api/...`, `/rest/...`), with no session yet.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base))
    }

    /// A session of `user` (the demo password).
    pub async fn token(&self, user: &str) -> String {
        let r = self
            .http
            .post(format!("{}/api/session", self.base))
            .basic_auth(user, Some(DEMO_PASSWORD))
            .send()
            .await
            .expect("the API answers");
        assert_eq!(r.status(), StatusCode::CREATED, "login of {user}");
        r.json::<String>().await.expect("a session id")
    }

    /// (status, body as text)
    pub async fn call(&self, method: Method, path: &str, token: &str) -> (StatusCode, String) {
        let r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header(SESSION, token)
            .send()
            .await
            .expect("the API answers");
        (r.status(), r.text().await.expect("a body"))
    }

    /// A GET that must answer 200 with JSON.
    pub async fn json(&self, path: &str, token: &str) -> Value {
        let (status, body) = self.call(Method::GET, path, token).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        serde_json::from_str(&body).expect("JSON")
    }
}
