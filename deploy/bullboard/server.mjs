// Bull Board (the BullMQ dashboard) over Conveyor's queues: the queue-level view next to
// Conveyor's own status (`conveyor status`, GET /api/admin/workers/status).
//
// Settings come from the environment, with Conveyor's names:
//   QUEUE_REDIS_HOST, QUEUE_REDIS_PORT, QUEUE_REDIS_DB, QUEUE_REDIS_USERNAME,
//   QUEUE_REDIS_PASSWORD, QUEUE_REDIS_TLS   where Redis is (as for every Conveyor process)
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
const prefix = env.QUEUE_PREFIX || 'bull';
const readOnlyMode = env.BULLBOARD_READ_ONLY === 'true';
const queues = regions.map((r) => new Queue(`workflow.execute.${r}`, { prefix, connection }));

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
  process.exit(0);
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
