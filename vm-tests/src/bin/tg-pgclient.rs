//! A bot that speaks the extended protocol through tokio-postgres: prepared statements,
//! pipelined queries and binary results. Prints one JSON object with what it saw, so a test
//! can compare a direct connection with one through tollgate.

use serde_json::{json, Value};
use tokio_postgres::NoTls;

fn err_json(e: &tokio_postgres::Error) -> Value {
    json!({"code": e.code().map(|c| c.code().to_string()), "message": e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string())})
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let conn = std::env::args().nth(1).expect("usage: tg-pgclient CONNSTR");
    let (client, connection) = match tokio_postgres::connect(&conn, NoTls).await {
        Ok(c) => c,
        Err(e) => {
            println!("{}", json!({"connect_error": err_json(&e)}));
            std::process::exit(2);
        }
    };
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut out = serde_json::Map::new();

    if std::env::args().nth(2).as_deref() == Some("--cancel") {
        // pg_sleep(30), cancelled from the client after 500 ms over a new connection.
        let token = client.cancel_token();
        let started = std::time::Instant::now();
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            token.cancel_query(NoTls).await.map_err(|e| e.to_string())
        });
        let r = client.simple_query("SELECT pg_sleep(30)").await;
        out.insert(
            "elapsed_ms".into(),
            json!(started.elapsed().as_millis() as u64),
        );
        out.insert(
            "cancel".into(),
            json!(canceller.await.ok().map(|r| r.err())),
        );
        out.insert(
            "result".into(),
            r.map(|_| json!("completed"))
                .unwrap_or_else(|e| err_json(&e)),
        );
        println!("{}", Value::Object(out));
        return;
    }

    if std::env::args().nth(2).as_deref() == Some("--held-delete") {
        // A parameterised DELETE (Parse/Bind/Execute) that policy holds for approval, then a
        // statement in the same session.
        let r = client
            .execute("DELETE FROM orders WHERE id = $1", &[&7i32])
            .await;
        out.insert(
            "delete".into(),
            r.map(|n| json!(n)).unwrap_or_else(|e| err_json(&e)),
        );
        let after = client
            .query_one("SELECT count(*)::int4 FROM orders", &[])
            .await
            .map(|r| json!(r.get::<_, i32>(0)))
            .unwrap_or_else(|e| err_json(&e));
        out.insert("after".into(), after);
        println!("{}", Value::Object(out));
        return;
    }

    // Prepared statement with a parameter, binary results (tokio-postgres' default).
    let stmt = client
        .prepare("SELECT id, name, email, card_number FROM customers WHERE id = $1")
        .await
        .expect("prepare");
    let mut rows = Vec::new();
    for id in [1i32, 2] {
        for r in client.query(&stmt, &[&id]).await.expect("query") {
            let (i, n, e, c): (i32, String, Option<String>, Option<String>) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            rows.push(json!([i, n, e, c]));
        }
    }
    out.insert("prepared".into(), Value::Array(rows));

    // Pipelined: three queries in flight at once.
    let (a, b, c) = tokio::join!(
        client.query_one("SELECT count(*) FROM orders", &[]),
        client.query_one(
            "SELECT sum(amount)::int8 FROM orders WHERE customer = $1",
            &[&1i32]
        ),
        client.query("SELECT id, amount FROM orders ORDER BY id LIMIT 3", &[]),
    );
    out.insert(
        "pipelined".into(),
        json!([
            a.map(|r| r.get::<_, i64>(0)).map_err(|e| err_json(&e)).ok(),
            b.map(|r| r.get::<_, i64>(0)).map_err(|e| err_json(&e)).ok(),
            c.map(|rs| rs
                .iter()
                .map(|r| json!([r.get::<_, i32>(0), r.get::<_, i32>(1)]))
                .collect::<Vec<_>>())
                .map_err(|e| err_json(&e))
                .ok(),
        ]),
    );

    // A write with parameters.
    let n = client
        .execute(
            "INSERT INTO audit_log(msg) VALUES ($1)",
            &[&"from tokio-postgres"],
        )
        .await
        .map_err(|e| err_json(&e));
    out.insert("insert".into(), json!(n.ok()));

    // A denied statement in the extended protocol, then the session goes on.
    let denied = client.execute("DROP TABLE no_such_table", &[]).await;
    out.insert(
        "drop".into(),
        denied.map(|n| json!(n)).unwrap_or_else(|e| err_json(&e)),
    );
    let after = client
        .query_one("SELECT 41 + 1", &[])
        .await
        .map(|r| r.get::<_, i32>(0));
    out.insert("after_denial".into(), json!(after.ok()));
    println!("{}", Value::Object(out));
}
