//! The hive's PKI and its rustls configurations.
//!
//! `hive init` creates one CA per hive ([`generate_ca`]); every node gets a certificate
//! issued by it ([`issue_node_cert`]) and serves the chain *node certificate, CA
//! certificate* ([`server_config`]). A client knows only the CA's fingerprint (SHA-256 of
//! its DER, [`fingerprint_pem`]) and pins it ([`client_config_pinned`]): it accepts a node
//! whose presented chain contains a CA with exactly that fingerprint and whose certificate
//! chains to that CA for the name the client dialled. No OS trust store is involved.
//!
//! Everything is built on rustls's ring provider passed explicitly; no process-wide default
//! provider is installed. Only TLS 1.3 is offered. Clients authenticate with the `Hello`
//! token, not with certificates.
//!
//! Between nodes TLS is mutual: a node dialling another ([`peer_client_config`]) pins the
//! CA like any client and also presents its own node certificate; servers ask every client
//! for one but do not require it ([`server_config`]: clients of mounts have none), and a
//! connection whose client presented a certificate that chains to the hive CA is a *peer*
//! connection ([`is_peer`]). Only peers may send Raft traffic.

use std::fmt;
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};
use sha2::{Digest, Sha256};

/// Errors building certificates or TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("PEM: {0}")]
    Pem(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("invalid CA fingerprint {0:?}: expected 64 hex digits")]
    BadFingerprint(String),
    #[error("invalid server name {0:?}")]
    BadServerName(String),
    #[error("the CA key does not belong to the CA certificate")]
    KeyMismatch,
}

/// A hive CA: certificate and private key, both PEM. The key signs node certificates and
/// belongs with the hive's secrets.
#[derive(Clone)]
pub struct CaMaterial {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaMaterial")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// The ring provider every config here uses, with AES-128-GCM preferred.
///
/// ring's default order puts AES-256-GCM first. With AES-NI, AES-128 does 10 rounds per
/// block where AES-256 does 14, and every byte of chunk data is encrypted by the sender
/// and decrypted by the receiver; AES-128-GCM is TLS 1.3's mandatory suite and ample here.
/// Both sides prefer it, so it is what is negotiated; a peer that prefers another of the
/// offered suites still connects.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    // A stable sort: the other suites keep their order after it.
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

fn ca_params(common_name: &str) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::OrganizationName, "HiveFS");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// A new self-signed CA (ECDSA P-256) for the hive `hive_name`.
pub fn generate_ca(hive_name: &str) -> Result<CaMaterial, TlsError> {
    let key = KeyPair::generate()?;
    let cert = ca_params(&format!("{hive_name} hive CA"))?.self_signed(&key)?;
    Ok(CaMaterial {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A CA rotation: a new self-signed CA (named `common_name`, which must differ from the
/// old CA's) and a *cross certificate*: the new CA's name and key, signed by the old CA.
/// A node that presents *node certificate (new CA), new CA, cross certificate, old CA*
/// is accepted by clients pinning either CA: a client pinning the old one follows the
/// cross certificate to it. Returns the new CA and the cross certificate (PEM).
pub fn rotate_ca(old: &CaMaterial, common_name: &str) -> Result<(CaMaterial, String), TlsError> {
    let old_key = KeyPair::from_pem(&old.key_pem)?;
    let old_der = first_cert(&old.cert_pem)?;
    if !contains(old_der.as_ref(), old_key.public_key_raw()) {
        return Err(TlsError::KeyMismatch);
    }
    let old_issuer = CertificateParams::from_ca_cert_der(&old_der)?.self_signed(&old_key)?;
    let key = KeyPair::generate()?;
    let cert = ca_params(common_name)?.self_signed(&key)?;
    let mut cross = ca_params(common_name)?;
    cross.use_authority_key_identifier_extension = true;
    let cross = cross.signed_by(&key, &old_issuer, &old_key)?;
    Ok((
        CaMaterial {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        },
        cross.pem(),
    ))
}

/// A certificate for node `node_name`, signed by the CA, for TLS server (and client) use.
/// Its subject alternative names are `sans` (IP literals such as `127.0.0.1` become IP
/// SANs, anything else DNS names, e.g. `localhost`) plus `node_name` when it is a usable
/// DNS name. Returns `(cert_pem, key_pem)`.
pub fn issue_node_cert(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    node_name: &str,
    sans: &[String],
) -> Result<(String, String), TlsError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let ca_der = first_cert(ca_cert_pem)?;
    if !contains(ca_der.as_ref(), ca_key.public_key_raw()) {
        return Err(TlsError::KeyMismatch);
    }
    // rcgen needs the issuer as a `Certificate`: rebuild it from the CA's parsed parameters
    // (subject and key identifier come from the PEM, so issued certs chain to the original).
    let issuer = CertificateParams::from_ca_cert_der(&ca_der)?.self_signed(&ca_key)?;

    let mut names: Vec<String> = sans.to_vec();
    if !names.iter().any(|n| n == node_name)
        && ServerName::try_from(node_name).is_ok_and(|n| matches!(n, ServerName::DnsName(_)))
    {
        names.push(node_name.to_string());
    }
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::OrganizationName, "HiveFS");
    params
        .distinguished_name
        .push(DnType::CommonName, node_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer, &ca_key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Lowercase hex SHA-256 of a DER certificate.
pub fn fingerprint_der(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Lowercase hex SHA-256 of the DER of the first certificate in `cert_pem` (give it the CA
/// certificate: this is what clients pin).
pub fn fingerprint_pem(cert_pem: &str) -> Result<String, TlsError> {
    Ok(fingerprint_der(first_cert(cert_pem)?.as_ref()))
}

/// Every certificate in a PEM text, in order.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Pem("no certificate found".into()));
    }
    Ok(certs)
}

fn first_cert(pem: &str) -> Result<CertificateDer<'static>, TlsError> {
    Ok(certs_from_pem(pem)?.swap_remove(0))
}

/// The first private key in a PEM text (PKCS#8, PKCS#1 or SEC1).
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| TlsError::Pem(e.to_string()))?
        .ok_or_else(|| TlsError::Pem("no private key found".into()))
}

/// A server name for [`client_config_pinned`] connections: a DNS name or an IP literal,
/// which must be among the node certificate's SANs.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string()).map_err(|_| TlsError::BadServerName(name.to_string()))
}

/// A node's certificate chain ending with the CA (added unless present), and the CA.
fn chain_with_ca(
    node_cert_pem: &str,
    ca_cert_pem: &str,
) -> Result<(Vec<CertificateDer<'static>>, CertificateDer<'static>), TlsError> {
    let mut chain = certs_from_pem(node_cert_pem)?;
    let ca = first_cert(ca_cert_pem)?;
    if !chain.contains(&ca) {
        chain.push(ca.clone());
    }
    Ok((chain, ca))
}

/// A node's server config: presents `node_cert_pem` followed by the CA certificate.
pub fn server_config(
    node_cert_pem: &str,
    node_key_pem: &str,
    ca_cert_pem: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let (chain, ca) = chain_with_ca(node_cert_pem, ca_cert_pem)?;
    let key = key_from_pem(node_key_pem)?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier(vec![ca])?)
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// Client certificates are optional (mounts have none) but verified when presented: a
/// handshake with a certificate that does not chain to one of the hive CAs fails.
fn client_verifier(
    cas: Vec<CertificateDer<'static>>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca)?;
    }
    Ok(
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| rustls::Error::General(format!("hive client verifier: {e}")))?,
    )
}

/// A node's certificate and key as files, read again when they change, so that a
/// rotation (`hive cert rotate`) needs no restart: it is the server certificate of every
/// new connection and the node's client certificate towards other nodes. Connections
/// made before a rotation keep the certificate they were made with.
///
/// The files are looked at no more than once per [`IDENTITY_RECHECK`]; a pair that does
/// not match (a rotation written half) or does not parse is ignored, and the previous
/// pair kept, until the files agree.
#[derive(Debug)]
pub struct NodeIdentity {
    cert_path: std::path::PathBuf,
    key_path: std::path::PathBuf,
    ca: CertificateDer<'static>,
    current: std::sync::RwLock<IdentityState>,
}

#[derive(Debug)]
struct IdentityState {
    key: Arc<rustls::sign::CertifiedKey>,
    stamp: Option<(std::time::SystemTime, std::time::SystemTime)>,
    checked: std::time::Instant,
}

/// How often a [`NodeIdentity`] looks at its files.
pub const IDENTITY_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

impl NodeIdentity {
    /// Load the pair at `cert_path`/`key_path`; the CA is added to the presented chain.
    pub fn load(
        cert_path: &std::path::Path,
        key_path: &std::path::Path,
        ca_cert_pem: &str,
    ) -> Result<Arc<NodeIdentity>, TlsError> {
        let ca = first_cert(ca_cert_pem)?;
        let (key, stamp) = Self::read(cert_path, key_path, &ca)?;
        Ok(Arc::new(NodeIdentity {
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
            ca,
            current: std::sync::RwLock::new(IdentityState {
                key,
                stamp,
                checked: std::time::Instant::now(),
            }),
        }))
    }

    fn stamp(
        cert_path: &std::path::Path,
        key_path: &std::path::Path,
    ) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
        let m = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        Some((m(cert_path)?, m(key_path)?))
    }

    #[allow(clippy::type_complexity)]
    fn read(
        cert_path: &std::path::Path,
        key_path: &std::path::Path,
        ca: &CertificateDer<'static>,
    ) -> Result<
        (
            Arc<rustls::sign::CertifiedKey>,
            Option<(std::time::SystemTime, std::time::SystemTime)>,
        ),
        TlsError,
    > {
        let stamp = Self::stamp(cert_path, key_path);
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(|e| TlsError::Pem(format!("{}: {e}", p.display())))
        };
        let mut chain = certs_from_pem(&read(cert_path)?)?;
        if !chain.contains(ca) {
            chain.push(ca.clone());
        }
        let key = provider()
            .key_provider
            .load_private_key(key_from_pem(&read(key_path)?)?)?;
        let certified = rustls::sign::CertifiedKey::new(chain, key);
        certified.keys_match()?;
        Ok((Arc::new(certified), stamp))
    }

    /// The pair to present now (reloaded first if the files changed).
    pub fn certified_key(&self) -> Arc<rustls::sign::CertifiedKey> {
        {
            let g = self.current.read().expect("identity lock");
            if g.checked.elapsed() < IDENTITY_RECHECK {
                return g.key.clone();
            }
        }
        let mut g = self.current.write().expect("identity lock");
        if g.checked.elapsed() >= IDENTITY_RECHECK {
            g.checked = std::time::Instant::now();
            let now = Self::stamp(&self.cert_path, &self.key_path);
            if now.is_some() && now != g.stamp {
                // Half written, or broken: keep presenting the previous pair.
                if let Ok((key, stamp)) = Self::read(&self.cert_path, &self.key_path, &self.ca) {
                    g.key = key;
                    g.stamp = stamp;
                }
            }
        }
        g.key.clone()
    }

    /// SHA-256 of the certificate presented now.
    pub fn fingerprint(&self) -> String {
        let k = self.certified_key();
        fingerprint_der(k.cert[0].as_ref())
    }
}

impl rustls::server::ResolvesServerCert for NodeIdentity {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.certified_key())
    }
}

impl rustls::client::ResolvesClientCert for NodeIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// [`server_config`] presenting `identity` (reloaded on rotation).
///
/// `trusted_cas_pem`: the hive CAs whose node certificates it accepts from peers: the
/// current CA and, after a CA rotation, the previous one (a node not yet rotated).
pub fn server_config_with(
    identity: Arc<NodeIdentity>,
    trusted_cas_pem: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier(certs_from_pem(trusted_cas_pem)?)?)
        .with_cert_resolver(identity);
    Ok(Arc::new(config))
}

/// [`peer_client_config`] presenting `identity` (reloaded on rotation), pinning every CA
/// in `trusted_cas_pem` (see [`server_config_with`]).
pub fn peer_client_config_with(
    identity: Arc<NodeIdentity>,
    trusted_cas_pem: &str,
) -> Result<Arc<ClientConfig>, TlsError> {
    let pins = certs_from_pem(trusted_cas_pem)?
        .iter()
        .map(|c| Sha256::digest(c.as_ref()).into())
        .collect();
    let config = builder_pinning(pins)?.with_client_cert_resolver(identity);
    Ok(Arc::new(config))
}

/// Did the client of this server connection present a certificate (verified against the
/// hive CA during the handshake, see [`server_config`])? Such a client is another node.
pub fn is_peer(conn: &rustls::Connection) -> bool {
    matches!(conn, rustls::Connection::Server(_))
        && conn.peer_certificates().is_some_and(|c| !c.is_empty())
}

/// A node's config for dialling another node of its hive: the CA is pinned (by the
/// fingerprint of `ca_cert_pem`) as for any client, and the node presents its own
/// certificate chain (`node_cert_pem` + the CA).
pub fn peer_client_config(
    ca_cert_pem: &str,
    node_cert_pem: &str,
    node_key_pem: &str,
) -> Result<Arc<ClientConfig>, TlsError> {
    let (chain, ca) = chain_with_ca(node_cert_pem, ca_cert_pem)?;
    let key = key_from_pem(node_key_pem)?;
    let config =
        pinned_builder(&fingerprint_der(ca.as_ref()))?.with_client_auth_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// A client config that trusts exactly the hive CA with this fingerprint (64 hex digits,
/// any case, `:` separators allowed).
pub fn client_config_pinned(ca_fingerprint_hex: &str) -> Result<Arc<ClientConfig>, TlsError> {
    Ok(Arc::new(
        pinned_builder(ca_fingerprint_hex)?.with_no_client_auth(),
    ))
}

/// A client config that trusts every CA certificate in `trusted_cas_pem` (a node's own
/// tools: its current CA and, after a rotation, the previous one, so that a command run
/// while the node still presents its old certificate connects).
pub fn client_config_trusting(trusted_cas_pem: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let pins = certs_from_pem(trusted_cas_pem)?
        .iter()
        .map(|c| Sha256::digest(c.as_ref()).into())
        .collect();
    Ok(Arc::new(builder_pinning(pins)?.with_no_client_auth()))
}

fn pinned_builder(
    ca_fingerprint_hex: &str,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, TlsError> {
    let cleaned: String = ca_fingerprint_hex
        .trim()
        .chars()
        .filter(|&c| c != ':')
        .collect();
    let pinned: [u8; 32] = hex::decode(&cleaned)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| TlsError::BadFingerprint(ca_fingerprint_hex.to_string()))?;
    builder_pinning(vec![pinned])
}

fn builder_pinning(
    pinned: Vec<[u8; 32]>,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, TlsError> {
    let provider = provider();
    let verifier = PinnedCaVerifier {
        pinned,
        provider: provider.clone(),
        inner: Mutex::new(Vec::new()),
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    Ok(config)
}

/// rustls's error as one readable line. Unlike rustls's own `Display`, a verifier's
/// custom error (such as the pinning mismatch) is shown by its message, not its `Debug`.
pub fn describe_error(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            format!("invalid peer certificate: {inner}")
        }
        other => other.to_string(),
    }
}

/// The message a pinning failure carries (inside rustls's invalid-certificate error).
#[derive(Debug)]
struct FingerprintMismatch {
    pinned: Vec<String>,
    presented: Vec<String>,
}

impl fmt::Display for FingerprintMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.presented.is_empty() {
            write!(
                f,
                "hive CA fingerprint mismatch: pinned {}, presented no CA certificate",
                self.pinned.join(" or ")
            )
        } else {
            write!(
                f,
                "hive CA fingerprint mismatch: pinned {}, presented {}",
                self.pinned.join(" or "),
                self.presented.join(", ")
            )
        }
    }
}

impl std::error::Error for FingerprintMismatch {}

/// Accepts a server whose chain carries a pinned CA and whose certificate chains to it
/// (directly, or through a cross certificate of a CA rotation, see [`rotate_ca`]).
#[derive(Debug)]
struct PinnedCaVerifier {
    /// Usually one; a node trusts its current and its previous CA.
    pinned: Vec<[u8; 32]>,
    provider: Arc<CryptoProvider>,
    /// rustls's WebPKI verifier rooted at each pinned CA, built from the first chain that
    /// carries it (SHA-256 identifies that CA uniquely, so one instance serves every
    /// connection).
    inner: Mutex<Vec<([u8; 32], Arc<WebPkiServerVerifier>)>>,
}

impl PinnedCaVerifier {
    fn webpki_for(
        &self,
        ca: &CertificateDer<'_>,
    ) -> Result<Arc<WebPkiServerVerifier>, rustls::Error> {
        let fp: [u8; 32] = Sha256::digest(ca.as_ref()).into();
        let mut built = self.inner.lock().expect("verifier lock");
        if let Some((_, v)) = built.iter().find(|(f, _)| *f == fp) {
            return Ok(v.clone());
        }
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(format!("hive CA verifier: {e}")))?;
        built.push((fp, v.clone()));
        Ok(v)
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let is_pinned = |c: &CertificateDer<'_>| {
            let fp: [u8; 32] = Sha256::digest(c.as_ref()).into();
            self.pinned.contains(&fp)
        };
        let Some(ca) = intermediates.iter().find(|c| is_pinned(c)) else {
            let mismatch = FingerprintMismatch {
                pinned: self.pinned.iter().map(hex::encode).collect(),
                presented: intermediates
                    .iter()
                    .map(|c| fingerprint_der(c.as_ref()))
                    .collect(),
            };
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(mismatch)),
            )));
        };
        let others: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .filter(|c| !is_pinned(c))
            .cloned()
            .collect();
        self.webpki_for(ca)?.verify_server_cert(
            end_entity,
            &others,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rustls::{ClientConnection, Connection, ServerConnection};
    use std::io::{Read, Write};

    /// One CA and one node certificate, shared by the tests (key generation is the slow
    /// part).
    pub(crate) struct Pki {
        pub ca: CaMaterial,
        pub node_cert: String,
        pub node_key: String,
    }

    pub(crate) fn pki() -> &'static Pki {
        static PKI: std::sync::OnceLock<Pki> = std::sync::OnceLock::new();
        PKI.get_or_init(|| {
            let ca = generate_ca("test").unwrap();
            let (node_cert, node_key) = issue_node_cert(
                &ca.cert_pem,
                &ca.key_pem,
                "node-a",
                &["localhost".into(), "127.0.0.1".into()],
            )
            .unwrap();
            Pki {
                ca,
                node_cert,
                node_key,
            }
        })
    }

    /// Move the records `from` has queued into `to`; whether there were any.
    fn transfer(from: &mut Connection, to: &mut Connection) -> Result<bool, rustls::Error> {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).unwrap();
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).unwrap();
            to.process_new_packets()?;
        }
        Ok(!wire.is_empty())
    }

    /// Move TLS records between the two ends until neither has anything to say. The error
    /// says whether the client (true) or the server failed.
    fn pump(client: &mut Connection, server: &mut Connection) -> Result<(), (bool, rustls::Error)> {
        for _ in 0..100 {
            let to_server = transfer(client, server).map_err(|e| (false, e))?;
            let to_client = transfer(server, client).map_err(|e| (true, e))?;
            if !to_server && !to_client {
                return Ok(());
            }
        }
        panic!("handshake did not settle");
    }

    fn handshake(
        fingerprint: &str,
        name: &str,
    ) -> Result<(Connection, Connection), (bool, rustls::Error)> {
        let p = pki();
        let sc = server_config(&p.node_cert, &p.node_key, &p.ca.cert_pem).unwrap();
        let cc = client_config_pinned(fingerprint).unwrap();
        let mut client =
            Connection::from(ClientConnection::new(cc, server_name(name).unwrap()).unwrap());
        let mut server = Connection::from(ServerConnection::new(sc).unwrap());
        pump(&mut client, &mut server)?;
        Ok((client, server))
    }

    #[test]
    fn fingerprint_is_sha256_of_the_ca_der() {
        let p = pki();
        let fp = fingerprint_pem(&p.ca.cert_pem).unwrap();
        assert_eq!(fp.len(), 64);
        assert_eq!(fp, fp.to_lowercase());
        let der = first_cert(&p.ca.cert_pem).unwrap();
        assert_eq!(fp, hex::encode(Sha256::digest(der.as_ref())));
        assert_ne!(fp, fingerprint_pem(&p.node_cert).unwrap());
        assert!(fingerprint_pem("not pem").is_err());
    }

    #[test]
    fn a_rotated_ca_is_accepted_by_clients_pinning_either() {
        let p = pki();
        let (new, cross) = rotate_ca(&p.ca, "test hive CA 2").unwrap();
        let (leaf, key) =
            issue_node_cert(&new.cert_pem, &new.key_pem, "node-a", &["localhost".into()]).unwrap();
        // What a rotated node presents: its certificate, the new CA, the cross
        // certificate, the old CA.
        let chain = format!("{leaf}{}{cross}{}", new.cert_pem, p.ca.cert_pem);
        let old_fp = fingerprint_pem(&p.ca.cert_pem).unwrap();
        let new_fp = fingerprint_pem(&new.cert_pem).unwrap();
        assert_ne!(old_fp, new_fp);
        let try_pin = |fp: &str, chain: &str| {
            let sc = server_config(chain, &key, &new.cert_pem).unwrap();
            let cc = client_config_pinned(fp).unwrap();
            let mut client = Connection::from(
                ClientConnection::new(cc, server_name("localhost").unwrap()).unwrap(),
            );
            let mut server = Connection::from(ServerConnection::new(sc).unwrap());
            pump(&mut client, &mut server)
        };
        try_pin(&old_fp, &chain).expect("a client pinning the old CA");
        try_pin(&new_fp, &chain).expect("a client pinning the new CA");
        // Without the cross certificate, the old pin cannot reach the new node
        // certificate: the cross certificate is what carries it.
        let no_cross = format!("{leaf}{}{}", new.cert_pem, p.ca.cert_pem);
        assert!(try_pin(&old_fp, &no_cross).is_err());
        // The old CA's key is checked.
        let wrong = CaMaterial {
            cert_pem: p.ca.cert_pem.clone(),
            key_pem: new.key_pem.clone(),
        };
        assert!(matches!(rotate_ca(&wrong, "x"), Err(TlsError::KeyMismatch)));
    }

    #[test]
    fn handshake_with_the_pinned_ca_carries_data() {
        let p = pki();
        let fp = fingerprint_pem(&p.ca.cert_pem).unwrap();
        for name in ["localhost", "127.0.0.1", "node-a"] {
            let (mut client, mut server) =
                handshake(&fp, name).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert!(!client.is_handshaking() && !server.is_handshaking());
            client.writer().write_all(b"ping").unwrap();
            pump(&mut client, &mut server).unwrap();
            let mut buf = [0u8; 4];
            server.reader().read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"ping");
        }
        // Upper case and colons are accepted in the pin.
        let colons: Vec<String> = fp
            .to_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8(c.to_vec()).unwrap())
            .collect();
        handshake(&colons.join(":"), "localhost").unwrap();
    }

    #[test]
    fn wrong_fingerprint_fails_clearly() {
        let p = pki();
        let wrong = "ab".repeat(32);
        let (is_client, err) = handshake(&wrong, "localhost").unwrap_err();
        assert!(is_client);
        let msg = describe_error(&err);
        let presented = fingerprint_pem(&p.ca.cert_pem).unwrap();
        assert!(
            msg.contains(&format!(
                "hive CA fingerprint mismatch: pinned {wrong}, presented {presented}"
            )),
            "{msg}"
        );
    }

    #[test]
    fn name_not_in_the_certificate_fails() {
        let fp = fingerprint_pem(&pki().ca.cert_pem).unwrap();
        let (is_client, err) = handshake(&fp, "elsewhere.example").unwrap_err();
        assert!(is_client);
        assert!(matches!(err, rustls::Error::InvalidCertificate(_)), "{err}");
    }

    /// A node certificate (and key) issued by another hive's CA, for `localhost`.
    fn foreign_node_cert() -> (String, String) {
        let other = generate_ca("other").unwrap();
        issue_node_cert(
            &other.cert_pem,
            &other.key_pem,
            "evil",
            &["localhost".into()],
        )
        .unwrap()
    }

    #[test]
    fn a_node_identity_follows_its_files_and_ignores_a_half_written_pair() {
        let p = pki();
        let dir = std::env::temp_dir().join(format!("hivefs-identity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cp, kp) = (dir.join("node.pem"), dir.join("node.key"));
        std::fs::write(&cp, &p.node_cert).unwrap();
        std::fs::write(&kp, &p.node_key).unwrap();
        let id = NodeIdentity::load(&cp, &kp, &p.ca.cert_pem).unwrap();
        let first = id.fingerprint();
        assert_eq!(first, fingerprint_pem(&p.node_cert).unwrap());
        assert_eq!(id.certified_key().cert.len(), 2, "the chain carries the CA");
        let (cert2, key2) = issue_node_cert(
            &p.ca.cert_pem,
            &p.ca.key_pem,
            "node-a",
            &["localhost".into()],
        )
        .unwrap();
        // Only the certificate replaced (the key not yet): the old pair stays in use.
        std::fs::write(&cp, &cert2).unwrap();
        std::thread::sleep(IDENTITY_RECHECK + std::time::Duration::from_millis(100));
        assert_eq!(
            id.fingerprint(),
            first,
            "a mismatched pair must not be presented"
        );
        // Both replaced: the new pair is presented (files are looked at once per recheck).
        std::fs::write(&kp, &key2).unwrap();
        std::thread::sleep(IDENTITY_RECHECK + std::time::Duration::from_millis(100));
        assert_eq!(id.fingerprint(), fingerprint_pem(&cert2).unwrap());
        // A server built on it hands out the new certificate in a real handshake.
        let sc = server_config_with(id.clone(), &p.ca.cert_pem).unwrap();
        let cc = client_config_pinned(&fingerprint_pem(&p.ca.cert_pem).unwrap()).unwrap();
        let mut client =
            Connection::from(ClientConnection::new(cc, server_name("localhost").unwrap()).unwrap());
        let mut server = Connection::from(ServerConnection::new(sc).unwrap());
        pump(&mut client, &mut server).unwrap();
        let got = client.peer_certificates().unwrap()[0].clone();
        assert_eq!(
            fingerprint_der(got.as_ref()),
            fingerprint_pem(&cert2).unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_cert_from_another_hive_with_the_right_ca_attached_fails() {
        // A node of another hive presenting the pinned CA's certificate (public) next to
        // its own: the pin matches but the chain does not.
        let p = pki();
        let (cert, key) = foreign_node_cert();
        let sc = server_config(&cert, &key, &p.ca.cert_pem).unwrap();
        let cc = client_config_pinned(&fingerprint_pem(&p.ca.cert_pem).unwrap()).unwrap();
        let mut client =
            Connection::from(ClientConnection::new(cc, server_name("localhost").unwrap()).unwrap());
        let mut server = Connection::from(ServerConnection::new(sc).unwrap());
        let (is_client, err) = pump(&mut client, &mut server).unwrap_err();
        assert!(is_client);
        assert!(matches!(err, rustls::Error::InvalidCertificate(_)), "{err}");
    }

    /// A handshake of a node (`cert`, `key`) dialling `pki()`'s node as a peer.
    fn peer_handshake(
        ca_pem: &str,
        cert: &str,
        key: &str,
    ) -> Result<(Connection, Connection), (bool, rustls::Error)> {
        let p = pki();
        let sc = server_config(&p.node_cert, &p.node_key, &p.ca.cert_pem).unwrap();
        let cc = peer_client_config(ca_pem, cert, key).unwrap();
        let mut client =
            Connection::from(ClientConnection::new(cc, server_name("localhost").unwrap()).unwrap());
        let mut server = Connection::from(ServerConnection::new(sc).unwrap());
        pump(&mut client, &mut server)?;
        Ok((client, server))
    }

    #[test]
    fn a_node_of_the_hive_is_a_peer_and_a_client_is_not() {
        let p = pki();
        let (cert, key) = issue_node_cert(
            &p.ca.cert_pem,
            &p.ca.key_pem,
            "node-b",
            &["localhost".into()],
        )
        .unwrap();
        let (client, server) = peer_handshake(&p.ca.cert_pem, &cert, &key).unwrap();
        assert!(is_peer(&server));
        assert!(!is_peer(&client), "only a server side has peers");
        let fp = fingerprint_pem(&p.ca.cert_pem).unwrap();
        let (_, server) = handshake(&fp, "localhost").unwrap();
        assert!(
            !is_peer(&server),
            "a client without a certificate is no peer"
        );
    }

    #[test]
    fn a_node_certificate_of_another_hive_is_refused_by_the_server() {
        let p = pki();
        let (cert, key) = foreign_node_cert();
        // It pins the right CA (public) but presents a certificate the hive did not issue.
        let (is_client, err) = peer_handshake(&p.ca.cert_pem, &cert, &key).unwrap_err();
        assert!(!is_client, "the server refuses: {err}");
        assert!(matches!(err, rustls::Error::InvalidCertificate(_)), "{err}");
    }

    #[test]
    fn bad_inputs_are_errors() {
        let p = pki();
        assert!(matches!(
            client_config_pinned("abc"),
            Err(TlsError::BadFingerprint(_))
        ));
        assert!(matches!(
            client_config_pinned(&"zz".repeat(32)),
            Err(TlsError::BadFingerprint(_))
        ));
        assert!(server_config("junk", &p.node_key, &p.ca.cert_pem).is_err());
        assert!(server_config(&p.node_cert, "junk", &p.ca.cert_pem).is_err());
        let other = generate_ca("other").unwrap();
        assert!(matches!(
            issue_node_cert(&p.ca.cert_pem, &other.key_pem, "n", &[]),
            Err(TlsError::KeyMismatch)
        ));
        assert!(server_name("not a name!").is_err());
        assert!(!format!("{:?}", p.ca).contains("PRIVATE"));
    }
}
