//! Per-service access policy: which uids and gids may serve and which may call each
//! service, from `[[policy]]` rules in the broker's configuration file.
//!
//! The first rule whose `services` patterns match a service name decides; administrators
//! (`admin_uids`/`admin_gids`) are always allowed. A service no rule matches keeps the
//! default: the broker's own uid and administrators only. Groups include supplementary
//! ones (`SO_PEERGROUPS`, read when the peer connects).

use serde::{Deserialize, Serialize};

/// One rule. Patterns are service names with `*` (any run of characters) and `?` (one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub services: Vec<String>,
    #[serde(default)]
    pub serve_uids: Vec<u32>,
    #[serde(default)]
    pub serve_gids: Vec<u32>,
    #[serde(default)]
    pub call_uids: Vec<u32>,
    #[serde(default)]
    pub call_gids: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Serve,
    Call,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Action::Serve => "serve",
            Action::Call => "call",
        }
    }
}

/// Who is asking: uid, and every gid (primary and supplementary).
pub struct Who<'a> {
    pub uid: u32,
    pub gids: &'a [u32],
    pub admin: bool,
}

/// Whether `who` may `action` `service` under `rules`; the refusal names the rule.
pub fn check(
    rules: &[Rule],
    broker_uid: u32,
    service: &str,
    action: Action,
    who: &Who<'_>,
) -> Result<(), String> {
    if who.admin {
        return Ok(());
    }
    let Some((n, rule)) = rules
        .iter()
        .enumerate()
        .find(|(_, r)| r.services.iter().any(|p| matches(p, service)))
    else {
        return if who.uid == broker_uid {
            Ok(())
        } else {
            Err(format!(
                "uid {} may not {} service '{service}': no policy rule matches it, and then only the broker's uid {broker_uid} and administrators may",
                who.uid,
                action.verb()
            ))
        };
    };
    let (uids, gids) = match action {
        Action::Serve => (&rule.serve_uids, &rule.serve_gids),
        Action::Call => (&rule.call_uids, &rule.call_gids),
    };
    if uids.contains(&who.uid) || who.gids.iter().any(|g| gids.contains(g)) {
        return Ok(());
    }
    Err(format!(
        "uid {} (groups {:?}) may not {} service '{service}': policy rule {} (services {:?}) allows uids {:?} and gids {:?}",
        who.uid,
        who.gids,
        action.verb(),
        n + 1,
        rule.services,
        uids,
        gids
    ))
}

/// Glob match with `*` and `?` (iterative, linear in practice; names are short).
pub fn matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && (p[i] == b'?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == b'*')
}

/// Checks rules for what the file cannot say by its types: empty pattern lists.
pub fn validate(rules: &[Rule]) -> Result<(), String> {
    for (n, r) in rules.iter().enumerate() {
        if r.services.is_empty() || r.services.iter().any(|p| p.is_empty()) {
            return Err(format!(
                "policy rule {}: `services` needs at least one non-empty pattern",
                n + 1
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(matches("billing.*", "billing.eu"));
        assert!(matches("*", "x"));
        assert!(matches("a?c", "abc"));
        assert!(matches("*.internal", "db.internal"));
        assert!(!matches("billing.*", "billing"));
        assert!(!matches("a?c", "ac"));
        assert!(matches("a*b*c", "aXXbYYc"));
        assert!(!matches("a*b*c", "aXXbYY"));
        // Backtracking past a false start, at the pattern's first character and later.
        assert!(matches("*ab", "aab"));
        assert!(matches("*ab", "xaaab"));
        assert!(matches("x*ab", "xaab"));
        assert!(matches("x*ab", "xabab"));
        assert!(!matches("*ab", "aabx"));
    }

    #[test]
    fn a_rule_needs_a_non_empty_pattern() {
        let rule = |services: &[&str]| Rule {
            services: services.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        assert!(validate(&[rule(&["a.*"]), rule(&["b", "c"])]).is_ok());
        let e = validate(&[rule(&["a"]), rule(&[])]).unwrap_err();
        assert!(e.contains("policy rule 2"), "{e}");
        assert!(validate(&[rule(&["a", ""])]).is_err(), "an empty pattern");
    }

    #[test]
    fn a_refusal_names_the_action_refused() {
        let rules = vec![Rule {
            services: vec!["s".into()],
            ..Default::default()
        }];
        let who = Who {
            uid: 5,
            gids: &[],
            admin: false,
        };
        for (action, verb) in [
            (Action::Call, "may not call"),
            (Action::Serve, "may not serve"),
        ] {
            let e = check(&rules, 0, "s", action, &who).unwrap_err();
            assert!(e.contains(verb), "{e}");
            let e = check(&[], 0, "s", action, &who).unwrap_err();
            assert!(e.contains(verb), "{e}");
        }
    }

    #[test]
    fn the_first_matching_rule_decides_and_refusals_name_it() {
        let rules = vec![
            Rule {
                services: vec!["open.*".into()],
                call_uids: vec![1000],
                ..Default::default()
            },
            Rule {
                services: vec!["*".into()],
                serve_gids: vec![50],
                ..Default::default()
            },
        ];
        let u1000 = Who {
            uid: 1000,
            gids: &[1000],
            admin: false,
        };
        assert!(check(&rules, 0, "open.echo", Action::Call, &u1000).is_ok());
        let e = check(&rules, 0, "open.echo", Action::Serve, &u1000).unwrap_err();
        assert!(e.contains("policy rule 1"), "{e}");
        let e = check(&rules, 0, "secret", Action::Call, &u1000).unwrap_err();
        assert!(e.contains("policy rule 2"), "{e}");
        let in_50 = Who {
            uid: 7,
            gids: &[7, 50],
            admin: false,
        };
        assert!(check(&rules, 0, "secret", Action::Serve, &in_50).is_ok());
        let admin = Who {
            uid: 9,
            gids: &[],
            admin: true,
        };
        assert!(check(&rules, 0, "open.echo", Action::Serve, &admin).is_ok());
        // No rule: the broker's uid only.
        assert!(check(&[], 0, "x", Action::Call, &u1000).is_err());
        assert!(check(&[], 1000, "x", Action::Call, &u1000).is_ok());
    }
}
