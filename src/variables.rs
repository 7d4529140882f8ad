//! A quick check of a request's variable values against the types its operation declares, for documents
//! that already passed full validation once (see [`crate::execution`]).
//!
//! It is conservative by design: it answers "certainly valid" only for values that async-graphql's own
//! validation accepts too, and "not sure" for everything else (a wrong type, an unknown field, a custom
//! scalar, a top-level `null`). "Not sure" is never an error: the request then gets the engine's full
//! validation, and its exact error. So the check can only choose the faster path, never change an answer.

use std::collections::{HashMap, HashSet};

use async_graphql::Variables;
use async_graphql::parser::types::{
    BaseType, Type, TypeKind, TypeSystemDefinition, VariableDefinition,
};
use async_graphql::{Name, Positioned, Value};

/// The schema's input types, read from its SDL (the same text as the committed `schema.graphql`).
#[derive(Debug, Default)]
pub struct InputTypes {
    types: HashMap<Name, InputKind>,
}

#[derive(Debug)]
enum InputKind {
    Object(Vec<InputField>),
    Enum(HashSet<Name>),
}

#[derive(Debug)]
struct InputField {
    name: Name,
    ty: Type,
    has_default: bool,
}

impl InputTypes {
    /// Reads the input objects and enums of a schema's SDL. Input objects with directives (such as
    /// `@oneOf`) are left out: their rules go beyond field types, so values of them are never "certain".
    pub fn from_sdl(sdl: &str) -> Result<Self, async_graphql::parser::Error> {
        let document = async_graphql::parser::parse_schema(sdl)?;
        let mut types = HashMap::new();
        for definition in document.definitions {
            let TypeSystemDefinition::Type(definition) = definition else {
                continue;
            };
            let definition = definition.node;
            if definition.extend || !definition.directives.is_empty() {
                continue;
            }
            let kind = match definition.kind {
                TypeKind::InputObject(object) => InputKind::Object(
                    object
                        .fields
                        .into_iter()
                        .map(|field| InputField {
                            name: field.node.name.node,
                            ty: field.node.ty.node,
                            has_default: field.node.default_value.is_some(),
                        })
                        .collect(),
                ),
                TypeKind::Enum(values) => InputKind::Enum(
                    values
                        .values
                        .into_iter()
                        .map(|value| value.node.value.node)
                        .collect(),
                ),
                _ => continue,
            };
            types.insert(definition.name.node, kind);
        }
        Ok(Self { types })
    }

    /// Whether every variable the operation declares certainly has a valid value in `variables`.
    /// A variable sent as `null` is "not sure": whether `null` is allowed can depend on default values
    /// where it is used, which only full validation sees.
    pub fn accept(
        &self,
        definitions: &[Positioned<VariableDefinition>],
        variables: &Variables,
    ) -> bool {
        definitions.iter().all(|definition| {
            let definition = &definition.node;
            match variables.get(&definition.name.node) {
                Some(Value::Null) => false,
                Some(value) => self.accepts(&definition.var_type.node, value),
                None => definition.var_type.node.nullable || definition.default_value.is_some(),
            }
        })
    }

    fn accepts(&self, ty: &Type, value: &Value) -> bool {
        if matches!(value, Value::Null) {
            return ty.nullable;
        }
        match &ty.base {
            // A single value where a list is expected is valid GraphQL (it becomes a list of one); it is
            // rare enough to leave to full validation.
            BaseType::List(item) => match value {
                Value::List(values) => values.iter().all(|value| self.accepts(item, value)),
                _ => false,
            },
            BaseType::Named(name) => self.accepts_named(name, value),
        }
    }

    fn accepts_named(&self, name: &str, value: &Value) -> bool {
        match name {
            // As async-graphql checks them; numeric IDs and out-of-range Ints are left to it.
            "String" | "ID" => matches!(value, Value::String(_)),
            "Boolean" => matches!(value, Value::Boolean(_)),
            "Int" => {
                matches!(value, Value::Number(n) if n.as_i64().is_some_and(|n| i32::try_from(n).is_ok()))
            }
            "Float" => matches!(value, Value::Number(_)),
            _ => match (self.types.get(name), value) {
                (Some(InputKind::Object(fields)), Value::Object(values)) => {
                    values
                        .keys()
                        .all(|key| fields.iter().any(|field| field.name == *key))
                        && fields.iter().all(|field| match values.get(&field.name) {
                            Some(value) => self.accepts(&field.ty, value),
                            None => field.ty.nullable || field.has_default,
                        })
                }
                (Some(InputKind::Enum(names)), Value::String(value)) => {
                    names.contains(value.as_str())
                }
                (Some(InputKind::Enum(names)), Value::Enum(value)) => names.contains(value),
                // A custom scalar, an unknown type, or a value of the wrong shape.
                _ => false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use async_graphql::parser::parse_query;
    use async_graphql::parser::types::DocumentOperations;
    use serde_json::json;

    use super::*;

    const SDL: &str = r#"
        enum Color { RED GREEN }
        scalar DateTime
        input Item { name: String!, count: Int, color: Color, tags: [String!], when: DateTime, rank: Int! = 1 }
        input Choice @oneOf { a: Int, b: Int }
        type Query { x: Int }
    "#;

    fn accepts(declaration: &str, variables: serde_json::Value) -> bool {
        let types = InputTypes::from_sdl(SDL).expect("the SDL parses");
        let document = parse_query(format!("query({declaration}) {{ x }}")).expect("parses");
        let DocumentOperations::Single(operation) = document.operations else {
            panic!("one operation")
        };
        let variables = Variables::from_json(variables);
        types.accept(&operation.node.variable_definitions, &variables)
    }

    #[test]
    fn values_of_the_declared_type_are_certain() {
        let certain = [
            ("$s: String!", json!({ "s": "x" })),
            ("$s: ID", json!({ "s": "x" })),
            ("$s: String", json!({})),
            ("$s: String! = \"d\"", json!({})),
            ("$n: Int!", json!({ "n": -2147483648i64 })),
            ("$f: Float!", json!({ "f": 1 })),
            ("$b: Boolean!", json!({ "b": false })),
            ("$c: Color!", json!({ "c": "GREEN" })),
            ("$i: Item!", json!({ "i": { "name": "a" } })),
            (
                "$i: Item!",
                json!({ "i": { "name": "a", "count": null, "color": "RED", "tags": ["t"] } }),
            ),
            (
                "$l: [Item!]!",
                json!({ "l": [{ "name": "a" }, { "name": "b", "rank": 2 }] }),
            ),
            ("$l: [Item!]!", json!({ "l": [] })),
            ("$l: [String]", json!({ "l": ["a", null] })),
        ];
        for (declaration, variables) in certain {
            assert!(
                accepts(declaration, variables.clone()),
                "{declaration} {variables}"
            );
        }
    }

    /// The property the fast path rests on: whatever the check calls certain, async-graphql's full
    /// validation accepts too, and the operation then runs the same in fast mode as in strict mode.
    mod agrees_with_async_graphql {
        use async_graphql::{
            EmptyMutation, EmptySubscription, Enum, ID, InputObject, Object, Request, Schema,
            ValidationMode,
        };
        use proptest::prelude::*;
        use serde_json::{Value as Json, json};

        use super::super::InputTypes;

        #[derive(Enum, Copy, Clone, PartialEq, Eq)]
        enum Color {
            Red,
            Green,
        }

        #[derive(InputObject)]
        struct Inner {
            a: String,
            b: Option<i32>,
        }

        #[derive(InputObject)]
        struct Item {
            name: String,
            count: Option<i32>,
            color: Option<Color>,
            tags: Option<Vec<String>>,
            #[graphql(default = 1)]
            rank: i32,
            id: Option<ID>,
            ratio: Option<f64>,
            flag: Option<bool>,
            inner: Option<Vec<Inner>>,
        }

        struct Query;

        #[Object]
        impl Query {
            async fn x(&self, item: Item, list: Option<Vec<Item>>, n: Option<i32>) -> i32 {
                // Echoes something of every argument, so a difference in coercion would show.
                item.rank
                    .wrapping_add(list.map_or(0, |list| list.len() as i32))
                    .wrapping_add(n.unwrap_or(0))
            }
        }

        type TestSchema = Schema<Query, EmptyMutation, EmptySubscription>;

        fn schema(mode: ValidationMode) -> TestSchema {
            Schema::build(Query, EmptyMutation, EmptySubscription)
                .validation_mode(mode)
                .finish()
        }

        fn any_value() -> impl Strategy<Value = Json> {
            let leaf = prop_oneof![
                Just(Json::Null),
                any::<bool>().prop_map(Json::from),
                any::<i64>().prop_map(Json::from),
                (-3i64..3).prop_map(Json::from),
                any::<f64>()
                    .prop_filter("finite", |f| f.is_finite())
                    .prop_map(Json::from),
                prop::sample::select(vec!["RED", "GREEN", "BLUE", "x", ""]).prop_map(Json::from),
            ];
            leaf.prop_recursive(2, 8, 3, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..3).prop_map(Json::from),
                    prop::collection::btree_map(
                        prop::sample::select(vec!["a", "b", "name", "bogus"])
                            .prop_map(str::to_owned),
                        inner,
                        0..3
                    )
                    .prop_map(|map| Json::Object(map.into_iter().collect())),
                ]
            })
        }

        /// Mostly a value of the right type, sometimes anything, sometimes left out (`None`).
        fn field(
            valid: impl Strategy<Value = Json> + 'static,
        ) -> impl Strategy<Value = Option<Json>> {
            prop_oneof![
                16 => valid.prop_map(Some),
                1 => any_value().prop_map(Some),
                3 => Just(None),
            ]
        }

        fn item() -> impl Strategy<Value = Json> {
            let inner = (
                field("[a-z]{0,3}".prop_map(Json::from)),
                field(any::<i32>().prop_map(Json::from)),
            )
                .prop_map(|(a, b)| object(vec![("a", a), ("b", b)]));
            (
                (
                    field("[a-z]{0,3}".prop_map(Json::from)),
                    field(any::<i32>().prop_map(Json::from)),
                    field(prop::sample::select(vec!["RED", "GREEN"]).prop_map(Json::from)),
                    field(
                        prop::collection::vec("[a-z]{0,2}".prop_map(Json::from), 0..3)
                            .prop_map(Json::from),
                    ),
                    field(any::<i32>().prop_map(Json::from)),
                ),
                (
                    field("[0-9a-z]{0,3}".prop_map(Json::from)),
                    field((-10.0f64..10.0).prop_map(Json::from)),
                    field(any::<bool>().prop_map(Json::from)),
                    field(prop::collection::vec(inner, 0..3).prop_map(Json::from)),
                    prop_oneof![19 => Just(None), 1 => any_value().prop_map(Some)],
                ),
            )
                .prop_map(
                    |((name, count, color, tags, rank), (id, ratio, flag, inner, bogus))| {
                        object(vec![
                            ("name", name),
                            ("count", count),
                            ("color", color),
                            ("tags", tags),
                            ("rank", rank),
                            ("id", id),
                            ("ratio", ratio),
                            ("flag", flag),
                            ("inner", inner),
                            ("bogus", bogus),
                        ])
                    },
                )
        }

        fn object(fields: Vec<(&str, Option<Json>)>) -> Json {
            Json::Object(
                fields
                    .into_iter()
                    .filter_map(|(name, value)| Some((name.to_owned(), value?)))
                    .collect(),
            )
        }

        fn variables() -> impl Strategy<Value = Json> {
            (
                field(item()),
                field(prop::collection::vec(item(), 0..3).prop_map(Json::from)),
                field(any::<i32>().prop_map(Json::from)),
            )
                .prop_map(|(i, l, n)| object(vec![("i", i), ("l", l), ("n", n)]))
        }

        const QUERY: &str =
            "query($i: Item!, $l: [Item!], $n: Int) { x(item: $i, list: $l, n: $n) }";

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]
            #[test]
            fn what_the_check_calls_certain_full_validation_accepts(variables in variables()) {
                let strict = schema(ValidationMode::Strict);
                let fast = schema(ValidationMode::Fast);
                let types = InputTypes::from_sdl(&strict.sdl()).expect("the SDL parses");
                let document = async_graphql::parser::parse_query(QUERY).expect("parses");
                let async_graphql::parser::types::DocumentOperations::Single(operation) = document.operations else {
                    panic!("one operation")
                };
                let vars = async_graphql::Variables::from_json(variables.clone());
                if types.accept(&operation.node.variable_definitions, &vars) {
                    let run = |schema: TestSchema| {
                        let request = Request::new(QUERY).variables(vars.clone());
                        futures::executor::block_on(async move { schema.execute(request).await })
                    };
                    let strict_response = run(strict);
                    prop_assert!(strict_response.errors.is_empty(), "{variables}: {:?}", strict_response.errors);
                    let fast_response = run(fast);
                    prop_assert_eq!(
                        json!(strict_response.data),
                        json!(fast_response.data),
                        "{}", variables
                    );
                    prop_assert!(fast_response.errors.is_empty());
                }
            }
        }
    }

    #[test]
    fn anything_else_is_left_to_full_validation() {
        let unsure = [
            ("$s: String!", json!({ "s": 1 })),
            ("$s: String!", json!({})),
            ("$s: String", json!({ "s": null })),
            ("$s: String = \"d\"", json!({ "s": null })),
            ("$s: ID!", json!({ "s": 7 })),
            ("$n: Int!", json!({ "n": 2147483648i64 })),
            ("$n: Int!", json!({ "n": 1.5 })),
            ("$n: Int!", json!({ "n": "1" })),
            ("$b: Boolean!", json!({ "b": "true" })),
            ("$c: Color!", json!({ "c": "BLUE" })),
            ("$i: Item!", json!({ "i": { "name": "a", "extra": 1 } })),
            ("$i: Item!", json!({ "i": { "count": 1 } })),
            ("$i: Item!", json!({ "i": { "name": null } })),
            ("$i: Item!", json!({ "i": { "name": "a", "rank": null } })),
            ("$i: Item!", json!({ "i": { "name": "a", "tags": [null] } })),
            (
                "$i: Item!",
                json!({ "i": { "name": "a", "when": "2026-01-01T00:00:00Z" } }),
            ),
            ("$i: Item!", json!({ "i": "a" })),
            ("$l: [Item!]!", json!({ "l": { "name": "a" } })),
            ("$l: [Item!]!", json!({ "l": [{ "name": "a" }, null] })),
            ("$o: Choice", json!({ "o": { "a": 1 } })),
            ("$u: Unknown", json!({ "u": 1 })),
        ];
        for (declaration, variables) in unsure {
            assert!(
                !accepts(declaration, variables.clone()),
                "{declaration} {variables}"
            );
        }
    }
}
