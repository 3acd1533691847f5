use super::*;
use ipc_proto::token::{SECRET_PREFIX, hash_secret, new_token};

fn table(text: &str) -> TokenTable {
    TokenTable::parse(text).unwrap()
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
