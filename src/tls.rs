//! One rustls crypto provider for the whole process. reqwest (Twilio REST), tungstenite
//! (OpenAI) and sqlx (Postgres) all ask rustls for the process default, and rustls refuses to
//! guess when none is installed. ring is the one compiled in; aws-lc-rs is kept out of the
//! build on purpose (it needs a C toolchain and would make two).
pub fn install_crypto_provider() {
    // Err means a provider is already installed (a second app in the same test process).
    let _ = rustls::crypto::ring::default_provider().install_default();
}
