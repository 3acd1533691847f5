use super::*;
use crate::config::Secret;

#[test]
fn urls_are_logged_without_passwords() {
    assert_eq!(
        redacted("redis://127.0.0.1:6379/"),
        "redis://127.0.0.1:6379/"
    );
    assert_eq!(
        redacted("redis://app:s3cret@redis:6379/0"),
        "redis://app:***@redis:6379/0"
    );
    assert_eq!(redacted("redis://:s3cret@redis/"), "redis://:***@redis/");
    assert!(!redacted("redis://u:p@ss@h/").contains("p@ss"));
    assert_eq!(
        redacted("rediss://app:pw@redis:6380/"),
        "rediss://app:***@redis:6380/"
    );
}

#[test]
fn the_acl_user_is_named_once_and_has_a_password() {
    let mut config = RedisBusConfig::new("redis://app@127.0.0.1/");
    config.username = Some("ops".into());
    config.password = Some(Secret::new("pw"));
    let error = Endpoint::new(&config).err().unwrap().to_string();
    assert!(
        error.contains("--redis-username \"ops\"") && error.contains("\"app\""),
        "{error}"
    );
    assert!(!error.contains("pw"), "{error}");

    // The same user twice, or the flag with a URL naming none: fine.
    config.username = Some("app".into());
    assert!(Endpoint::new(&config).is_ok());
    config.target = Target::Url("redis://127.0.0.1/".into());
    assert!(Endpoint::new(&config).is_ok());
    // A password in the URL serves the flag's user too.
    config.password = None;
    config.target = Target::Url("redis://:pw@127.0.0.1/".into());
    assert!(Endpoint::new(&config).is_ok());

    config.target = Target::Url("redis://127.0.0.1/".into());
    let error = Endpoint::new(&config).err().unwrap().to_string();
    assert!(error.contains("needs a password"), "{error}");
    config.target = Target::Sentinel {
        sentinels: vec!["127.0.0.1:26379".into()],
        master: "fleet".into(),
    };
    let error = Endpoint::new(&config).err().unwrap().to_string();
    assert!(error.contains("needs a password"), "{error}");
    config.password = Some(Secret::new("pw"));
    assert!(Endpoint::new(&config).is_ok());
}

#[test]
fn sentinel_credentials_go_with_sentinel_only() {
    let mut config = RedisBusConfig::new("redis://127.0.0.1/");
    config.sentinel_auth.password = Some(Secret::new("sentinel-pw"));
    let error = Endpoint::new(&config).err().unwrap().to_string();
    assert!(error.contains("need --redis-sentinel"), "{error}");

    config.target = Target::Sentinel {
        sentinels: vec!["127.0.0.1:26379".into()],
        master: "fleet".into(),
    };
    config.sentinel_auth.username = Some("watcher".into());
    assert!(Endpoint::new(&config).is_ok());
    config.sentinel_auth.password = None;
    let error = Endpoint::new(&config).err().unwrap().to_string();
    assert!(
        error
            .contains("--redis-sentinel-username \"watcher\" needs --redis-sentinel-password-file"),
        "{error}"
    );
}

#[test]
fn a_refused_sentinel_password_is_said_to_be_the_sentinels() {
    let refused = RedisError::from((
        redis::ErrorKind::AuthenticationFailed,
        "Password authentication failed",
    ));
    let said = describe_sentinel(&refused);
    assert!(
        said.contains("authentication failed") && said.contains("--redis-sentinel-password-file"),
        "{said}"
    );
    // Towards the primary, the same error names the primary's flags.
    let said = describe(&refused);
    assert!(said.contains("--redis-password-file"), "{said}");
    assert!(!said.contains("sentinel"), "{said}");
}

#[test]
fn tls_files_need_a_tls_url_and_come_in_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = RedisBusConfig::new("redis://127.0.0.1/");
    config.tls.cert = Some(dir.path().join("cert.pem"));
    let error = Endpoint::new(&config).err().unwrap().to_string();
    assert!(error.contains("go together"), "{error}");

    config.tls = TlsFiles {
        ca: Some(dir.path().join("missing.pem")),
        ..TlsFiles::default()
    };
    let error = Endpoint::new(&config).err().unwrap().to_string();
    assert!(error.contains("cannot read --redis-ca"), "{error}");

    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate").unwrap();
    config.tls.ca = Some(ca.clone());
    let error = Endpoint::new(&config).err().unwrap().to_string();
    assert!(error.contains("holds no PEM CERTIFICATE"), "{error}");
}
