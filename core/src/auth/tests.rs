use super::*;

fn table(text: &str) -> TokenTable {
    TokenTable::parse(text).unwrap()
}

fn metadata(secret: &str) -> MetadataMap {
    let mut md = MetadataMap::new();
    md.insert(AUTHORIZATION_METADATA, bearer(secret).unwrap());
    md
}

#[test]
fn a_new_token_is_accepted_by_its_own_entry_and_grants_nothing() {
    let (secret, entry) = new_token("ops").unwrap();
    assert!(secret.starts_with(SECRET_PREFIX));
    let table = table(&entry);
    let found = table.by_secret(&secret).unwrap();
    assert_eq!(found.name, "ops");
    assert_eq!(*found.grants, Grants::default());
    assert!(table.by_secret("ipct_wrong").is_none());
    assert!(new_token("bad name").is_err());
}

#[test]
fn grants_expand_the_app_prefix_and_match_channels() {
    let t = table(&format!(
        r#"[[token]]
name = "ops"
app = "shop"
sha256 = "{}"
broadcast = [":worker"]
send = ["shop:*"]
subscribe = [":>"]
members = true
"#,
        hash_secret("s3cret")
    ));
    let g = &t.by_secret("s3cret").unwrap().grants;
    assert!(g.may_broadcast("shop:worker"));
    assert!(!g.may_broadcast("shop:web"));
    assert!(g.may_send("shop:w1"));
    assert!(!g.may_send("shop:w1:x"));
    assert!(g.may_subscribe(&Pattern::parse("shop:worker:*").unwrap()));
    assert!(!g.may_subscribe(&Pattern::parse("other:>").unwrap()));
    assert!(g.members);
}

#[test]
fn mistakes_in_the_file_are_refused_with_the_entry_named() {
    let bad = [
        ("[[token]]\nname = \"a\"\n", "neither sha256 nor cert_name"),
        ("[[token]]\nname = \"a\"\nsha256 = \"zz\"\n", "not hex"),
        ("[[token]]\nname = \"a\"\nsha256 = \"abcd\"\n", "32 bytes"),
        (
            "[[token]]\nname = \"a b\"\ncert_name = \"x\"\n",
            "invalid character",
        ),
        (
            "[[token]]\nname = \"a\"\ncert_name = \"x\"\nbroadcast = [\"a:>:b\"]\n",
            "broadcast grant",
        ),
        (
            "[[token]]\nname = \"a\"\ncert_name = \"x\"\nsend = [\":x\"]\n",
            "no app id",
        ),
        (
            "[[token]]\nname = \"a\"\ncert_name = \"x\"\nbroadcats = []\n",
            "unknown field",
        ),
        (
            "[[token]]\nname = \"a\"\ncert_name = \"x\"\n[[token]]\nname = \"a\"\ncert_name = \"y\"\n",
            "unique",
        ),
    ];
    for (text, expected) in bad {
        let error = TokenTable::parse(text).unwrap_err().to_string();
        assert!(error.contains(expected), "{text:?}: {error}");
    }
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
