// A Node.js BullMQ worker that takes one job Conveyor enqueued and prints its name and data.
// usage: node consumer.mjs <port> <prefix> <queue>
import { Worker } from 'bullmq';

const [port, prefix, queueName] = process.argv.slice(2);
const connection = { host: '127.0.0.1', port: Number(port), maxRetriesPerRequest: null };
let worker;
const seen = new Promise((resolve) => {
  worker = new Worker(queueName, async (job) => {
    resolve({ id: job.id, name: job.name, data: job.data, attempts: job.opts.attempts });
    return 'ok';
  }, { prefix, connection });
});
const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error('no job within 10 s')), 10000).unref());
try {
  console.log(JSON.stringify(await Promise.race([seen, timeout])));
} finally {
  await worker.close();
}
