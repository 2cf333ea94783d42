// Node.js BullMQ on a Redis Cluster (ioredis Cluster): the queue names Conveyor uses there
// carry a hash tag, `{workflow.execute.us}`, so BullMQ's keys of one queue share a slot.
// usage: node cluster.mjs <host:port,...> <prefix> <queue> produce <jobName> <jobId> '<json data>'
//        node cluster.mjs <host:port,...> <prefix> <queue> consume
//        node cluster.mjs <host:port,...> <prefix> <queue> counts
import { Queue, Worker } from 'bullmq';
import { Cluster } from 'ioredis';

const [nodes, prefix, queueName, mode, ...rest] = process.argv.slice(2);
const startup = nodes.split(',').map((n) => {
  const i = n.lastIndexOf(':');
  return { host: n.slice(0, i), port: Number(n.slice(i + 1)) };
});
const clients = [];
const cluster = () => {
  const client = new Cluster(startup, { redisOptions: { maxRetriesPerRequest: null } });
  clients.push(client);
  return client;
};

async function produce([jobName, jobId, data]) {
  const queue = new Queue(queueName, { prefix, connection: cluster() });
  try {
    const job = await queue.add(jobName, JSON.parse(data), { jobId });
    return { id: job.id };
  } finally {
    await queue.close();
  }
}

async function consume() {
  let worker;
  const seen = new Promise((resolve) => {
    worker = new Worker(queueName, async (job) => {
      resolve({ id: job.id, name: job.name, data: job.data, attempts: job.opts.attempts });
      return 'ok';
    }, { prefix, connection: cluster() });
  });
  const timeout = new Promise((_, reject) => setTimeout(() => reject(new Error('no job within 10 s')), 10000).unref());
  try {
    return await Promise.race([seen, timeout]);
  } finally {
    await worker.close();
  }
}

async function counts() {
  const queue = new Queue(queueName, { prefix, connection: cluster() });
  try {
    const counts = await queue.getJobCounts('waiting', 'active', 'delayed', 'completed', 'failed');
    const completed = await queue.getCompleted(0, 10);
    return { counts, completed: completed.map((j) => ({ id: j.id, returnvalue: j.returnvalue })) };
  } finally {
    await queue.close();
  }
}

const modes = { produce, consume, counts };
const result = await modes[mode](rest);
// BullMQ does not close a connection it was given: end the ioredis clusters here.
await Promise.all(clients.map((c) => c.quit().catch(() => c.disconnect())));
console.log(JSON.stringify(result));
