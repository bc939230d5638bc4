//! JSON merge patch (RFC 7386) and JSON patch (RFC 6902).

use serde_json::Value;

/// Applies a merge patch: objects merge key by key, `null` removes, anything else replaces.
pub fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            let Value::Object(target) = target else {
                return;
            };
            for (key, value) in fields {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Applies a JSON patch (add, remove, replace, test, copy, move); all or nothing.
pub fn json_patch(target: &mut Value, operations: &Value) -> Result<(), String> {
    let operations = operations
        .as_array()
        .ok_or("a JSON patch is an array of operations")?;
    let mut result = target.clone();
    for operation in operations {
        let op = operation["op"].as_str().ok_or("operation without \"op\"")?;
        let path = operation["path"]
            .as_str()
            .ok_or("operation without \"path\"")?;
        match op {
            "add" => add(&mut result, path, operation["value"].clone())?,
            "remove" => {
                remove(&mut result, path)?;
            }
            "replace" => {
                remove(&mut result, path)?;
                add(&mut result, path, operation["value"].clone())?;
            }
            "test" => {
                if result.pointer(path) != Some(&operation["value"]) {
                    return Err(format!("test failed at {path}"));
                }
            }
            "copy" | "move" => {
                let from = operation["from"]
                    .as_str()
                    .ok_or("operation without \"from\"")?;
                let value = if op == "move" {
                    remove(&mut result, from)?
                } else {
                    result
                        .pointer(from)
                        .cloned()
                        .ok_or(format!("no value at {from}"))?
                };
                add(&mut result, path, value)?;
            }
            other => return Err(format!("unknown JSON patch operation {other:?}")),
        }
    }
    *target = result;
    Ok(())
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn split(path: &str) -> Result<(&str, String), String> {
    let (parent, last) = path
        .rsplit_once('/')
        .ok_or_else(|| format!("invalid JSON pointer {path:?}"))?;
    Ok((parent, unescape(last)))
}

fn add(target: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *target = value;
        return Ok(());
    }
    let (parent, last) = split(path)?;
    match target.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.insert(last, value);
            Ok(())
        }
        Some(Value::Array(items)) => {
            let index = if last == "-" {
                items.len()
            } else {
                last.parse()
                    .map_err(|_| format!("bad array index in {path}"))?
            };
            if index > items.len() {
                return Err(format!("index out of range in {path}"));
            }
            items.insert(index, value);
            Ok(())
        }
        _ => Err(format!("no parent for {path}")),
    }
}

fn remove(target: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = split(path)?;
    match target.pointer_mut(parent) {
        Some(Value::Object(map)) => map.remove(&last).ok_or(format!("no value at {path}")),
        Some(Value::Array(items)) => {
            let index: usize = last
                .parse()
                .map_err(|_| format!("bad array index in {path}"))?;
            (index < items.len())
                .then(|| items.remove(index))
                .ok_or(format!("index out of range in {path}"))
        }
        _ => Err(format!("no value at {path}")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn merge_patch_adds_replaces_and_removes() {
        let mut object = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"x": [1]}});
        merge(
            &mut object,
            &json!({"metadata": {"labels": {"a": null, "c": "3"}}, "spec": {"x": [2]}}),
        );
        assert_eq!(
            object,
            json!({"metadata": {"labels": {"b": "2", "c": "3"}}, "spec": {"x": [2]}})
        );
    }

    #[test]
    fn json_patch_escapes_and_is_all_or_nothing() {
        let mut object = json!({"metadata": {"annotations": {}}});
        json_patch(
            &mut object,
            &json!([{"op": "add", "path": "/metadata/annotations/interceptor.io~1enrolled", "value": "x"}]),
        )
        .unwrap();
        assert_eq!(
            object["metadata"]["annotations"]["interceptor.io/enrolled"],
            "x"
        );
        let before = object.clone();
        assert!(
            json_patch(
                &mut object,
                &json!([{"op": "remove", "path": "/metadata/annotations/interceptor.io~1enrolled"},
                        {"op": "remove", "path": "/nope/x"}]),
            )
            .is_err()
        );
        assert_eq!(object, before);
    }
}
