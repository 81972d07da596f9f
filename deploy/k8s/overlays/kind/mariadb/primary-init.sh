# Sourced (not executed) by the mariadb image's entrypoint on first start, from
# /docker-entrypoint-initdb.d: docker_process_sql talks to the temporary server.
# Everything here is binlogged, so the replica replays it from GTID 0.
docker_process_sql --database=mysql <<SQL
SET SQL_LOG_BIN = 1;
CREATE DATABASE IF NOT EXISTS chat;
CREATE USER IF NOT EXISTS 'chat'@'%' IDENTIFIED BY '${CHAT_PASSWORD}';
GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, INDEX, ALTER, REFERENCES ON chat.* TO 'chat'@'%';
CREATE USER IF NOT EXISTS 'repl'@'%' IDENTIFIED BY '${REPLICATION_PASSWORD}';
GRANT REPLICATION SLAVE ON *.* TO 'repl'@'%';
SQL
