// Bull Board (the BullMQ dashboard) over Conveyor's queues: the queue-level view next to
// Conveyor's own status (`conveyor status`, GET /api/admin/workers/status).
//
// Settings come from the environment, with Conveyor's names:
//   QUEUE_REDIS_HOST, QUEUE_REDIS_PORT, QUEUE_REDIS_DB, QUEUE_REDIS_USERNAME,
//   QUEUE_REDIS_PASSWORD, QUEUE_REDIS_TLS   where Redis is (as for every Conveyor process)
//   QUEUE_REDIS_CLUSTER_NODES  host:port,… of a Redis Cluster (instead of QUEUE_REDIS_HOST/PORT):
//                       the queues are then named {workflow.execute.<region>} (a hash tag)
//   QUEUE_PREFIX        BullMQ key prefix (default bull)
//   EXECUTION_REGIONS   regions whose workflow.execute.<region> queue to show (default us)
//   BULLBOARD_PORT      where the dashboard listens (default 3000)
//   BULLBOARD_READ_ONLY "true": no pause/retry/clean buttons
//
// Bull Board has no sign-in of its own: publish it only on a private network or behind an
// authenticating proxy (docs/operations.md).
import { createBullBoard } from '@bull-board/api';
import { BullMQAdapter } from '@bull-board/api/bullMQAdapter';
import { ExpressAdapter } from '@bull-board/express';
import { Queue } from 'bullmq';
import express from 'express';
import { Cluster } from 'ioredis';

const env = process.env;
const regionRe = /^[a-z0-9][a-z0-9-]{0,31}$/;
const regions = (env.EXECUTION_REGIONS || 'us').split(',').map((r) => r.trim()).filter(Boolean);
for (const region of regions) {
  if (!regionRe.test(region)) {
    console.error(`bullboard: EXECUTION_REGIONS: invalid region ${JSON.stringify(region)}`);
    process.exit(2);
  }
}
const port = Number(env.BULLBOARD_PORT || 3000);
if (!Number.isInteger(port) || port < 1 || port > 65535) {
  console.error(`bullboard: BULLBOARD_PORT: not a port: ${JSON.stringify(env.BULLBOARD_PORT)}`);
  process.exit(2);
}
const connection = {
  host: env.QUEUE_REDIS_HOST || '127.0.0.1',
  port: Number(env.QUEUE_REDIS_PORT || 6379),
  db: Number(env.QUEUE_REDIS_DB || 0),
  username: env.QUEUE_REDIS_USERNAME || undefined,
  password: env.QUEUE_REDIS_PASSWORD || undefined,
  tls: env.QUEUE_REDIS_TLS === 'true' ? {} : undefined,
  maxRetriesPerRequest: null,
};
const clusterNodes = (env.QUEUE_REDIS_CLUSTER_NODES || '').split(',').map((n) => n.trim()).filter(Boolean);
const startup = clusterNodes.map((node) => {
  const i = node.lastIndexOf(':');
  const host = node.slice(0, i).replace(/^\[(.*)\]$/, '$1');
  const nodePort = Number(node.slice(i + 1));
  if (i < 1 || !Number.isInteger(nodePort) || nodePort < 1 || nodePort > 65535) {
    console.error(`bullboard: QUEUE_REDIS_CLUSTER_NODES: not host:port: ${JSON.stringify(node)}`);
    process.exit(2);
  }
  return { host, port: nodePort };
});
// On a Redis Cluster every process connects to the cluster and each queue's name carries a
// hash tag, so its keys share one slot (docs/redis-ha.md#redis-cluster).
const { host: _host, port: _port, db: _db, ...nodeOptions } = connection;
const clients = [];
const redis = () => {
  if (!startup.length) return connection;
  const client = new Cluster(startup, { redisOptions: nodeOptions });
  clients.push(client); // BullMQ does not close a connection it is given
  return client;
};
const queueName = (region) => (startup.length ? `{workflow.execute.${region}}` : `workflow.execute.${region}`);
const prefix = env.QUEUE_PREFIX || 'bull';
const readOnlyMode = env.BULLBOARD_READ_ONLY === 'true';
const queues = regions.map((r) => new Queue(queueName(r), { prefix, connection: redis() }));

const serverAdapter = new ExpressAdapter();
serverAdapter.setBasePath('/');
createBullBoard({
  queues: queues.map((q) => new BullMQAdapter(q, { readOnlyMode })),
  serverAdapter,
  options: { uiConfig: { boardTitle: 'Conveyor queues' } },
});
const app = express();
app.get('/healthz', (_req, res) => res.json({ ok: true }));
app.use('/', serverAdapter.getRouter());
const server = app.listen(port, () => {
  console.log(JSON.stringify({ event: 'bullboard.listening', port, prefix, regions }));
});

async function stop() {
  server.close();
  await Promise.allSettled(queues.map((q) => q.close()));
  await Promise.allSettled(clients.map((c) => c.quit()));
  process.exit(0);
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
