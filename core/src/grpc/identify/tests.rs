use super::*;
use crate::auth::TokenTable;
use ipc_proto::token::{hash_secret, new_token};

fn table(text: &str) -> TokenTable {
    TokenTable::parse(text).unwrap()
}

fn metadata(secret: &str) -> MetadataMap {
    let mut md = MetadataMap::new();
    md.insert(AUTHORIZATION_METADATA, bearer(secret).unwrap());
    md
}

#[test]
fn identify_names_the_caller_after_its_token() {
    let identity = TokenIdentity::from_table(table(&format!(
        "[[token]]\nname = \"ops\"\napp = \"shop\"\nsha256 = \"{}\"\n[[token]]\nname = \"edge\"\ncert_name = \"edge.shop\"\n",
        hash_secret("s3cret")
    )));
    let peer = Peer::default();
    let mut md = metadata("s3cret");
    md.insert("ipc-sender", "someone-else".parse().unwrap());
    let caller = identity.identify(&md, &peer).unwrap();
    assert_eq!(caller.sender, "ops");
    assert_eq!(caller.app.as_deref(), Some("shop"));
    assert!(caller.grants.is_some());

    let wrong = identity.identify(&metadata("nope"), &peer).unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
    let none = identity.identify(&MetadataMap::new(), &peer).unwrap_err();
    assert_eq!(none.code(), tonic::Code::Unauthenticated);
    let mut basic = MetadataMap::new();
    basic.insert(AUTHORIZATION_METADATA, "Basic abc".parse().unwrap());
    assert_eq!(
        identity.identify(&basic, &peer).unwrap_err().code(),
        tonic::Code::Unauthenticated
    );

    let by_cert = Peer {
        addr: None,
        cert_names: vec!["other".into(), "edge.shop".into()],
        ..Peer::default()
    };
    assert_eq!(
        identity
            .identify(&MetadataMap::new(), &by_cert)
            .unwrap()
            .sender,
        "edge"
    );
    let unknown_cert = Peer {
        addr: None,
        cert_names: vec!["stranger".into()],
        ..Peer::default()
    };
    assert_eq!(
        identity
            .identify(&MetadataMap::new(), &unknown_cert)
            .unwrap_err()
            .code(),
        tonic::Code::Unauthenticated
    );
    let trusting = TokenIdentity::certificates_only();
    let caller = trusting
        .identify(&MetadataMap::new(), &unknown_cert)
        .unwrap();
    assert_eq!(caller.sender, "stranger");
    assert_eq!(caller.grants.as_deref(), Some(&Grants::all()));
}

#[test]
fn reload_swaps_the_table_and_keeps_it_on_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.toml");
    let (one, entry_one) = new_token("one").unwrap();
    std::fs::write(&path, &entry_one).unwrap();
    let identity = TokenIdentity::from_file(&path).unwrap();
    let (two, entry_two) = new_token("two").unwrap();
    assert!(
        identity
            .identify(&metadata(&two), &Peer::default())
            .is_err()
    );
    std::fs::write(&path, format!("{entry_one}\n{entry_two}")).unwrap();
    assert_eq!(identity.reload().unwrap(), 2);
    assert_eq!(
        identity
            .identify(&metadata(&two), &Peer::default())
            .unwrap()
            .sender,
        "two"
    );
    std::fs::write(&path, "not toml [").unwrap();
    assert!(identity.reload().is_err());
    assert!(identity.identify(&metadata(&one), &Peer::default()).is_ok());
}
