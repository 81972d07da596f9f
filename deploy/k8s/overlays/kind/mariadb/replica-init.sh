# Sourced by the mariadb image's entrypoint on the replica's first start:
# forget the replica's own bootstrap transactions and follow the primary by
# GTID from the beginning (it replays the chat database and users).
docker_process_sql --database=mysql <<SQL
RESET MASTER;
SET GLOBAL gtid_slave_pos = '';
CHANGE MASTER TO
  MASTER_HOST = 'mariadb-primary-0.mariadb-primary.chat.svc.cluster.local',
  MASTER_PORT = 3306,
  MASTER_USER = 'repl',
  MASTER_PASSWORD = '${REPLICATION_PASSWORD}',
  MASTER_USE_GTID = slave_pos,
  MASTER_CONNECT_RETRY = 2;
SQL
