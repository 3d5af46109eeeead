//! Query strings of list calls: repeatable keys (`?names=a&names=b`), also in the older
//! spellings `filter.names=a` and `filter.names.1=a`.

use crate::api::error::ApiError;
use crate::api::vcenter::Filter;

/// The filter a query string gives. A key outside `allowed` is refused rather than
/// ignored: a misspelt filter (`?name=web01`) must not widen a list to everything.
pub fn filter(query: Option<&str>, allowed: &[&str]) -> Result<Filter, ApiError> {
    let mut filter = Filter::default();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let mut name = key.strip_prefix("filter.").unwrap_or(&key);
        if let Some((base, index)) = name.rsplit_once('.') {
            if !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()) {
                name = base;
            }
        }
        if !allowed.contains(&name) {
            return Err(ApiError::invalid_argument(format!(
                "unknown query parameter {key:?}; this list takes {}",
                if allowed.is_empty() {
                    "none".to_owned()
                } else {
                    allowed.join(", ")
                }
            )));
        }
        filter.add(name, &value);
    }
    Ok(filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_and_old_style_keys_collect_into_one_set() {
        let f = filter(
            Some("names=a&names=b%20c&filter.names=d&filter.power_states.1=POWERED_OFF"),
            &["names", "power_states"],
        )
        .unwrap();
        assert_eq!(f.get("names").unwrap(), ["a", "b c", "d"]);
        assert_eq!(f.get("power_states").unwrap(), ["POWERED_OFF"]);
        assert!(f.allows("names", "b c") && !f.allows("names", "e"));
        assert!(f.allows("hosts", "anything"), "an absent field allows all");
        assert_eq!(filter(None, &[]).unwrap(), Filter::default());
    }

    #[test]
    fn unknown_keys_are_invalid_arguments() {
        let e = filter(Some("name=web01"), &["names"]).unwrap_err();
        assert_eq!(e.kind, crate::api::error::ErrorKind::InvalidArgument);
        assert!(
            e.message.contains("\"name\"") && e.message.contains("names"),
            "{}",
            e.message
        );
    }
}
