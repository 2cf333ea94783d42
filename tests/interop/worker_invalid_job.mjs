// Adds a workflow.execute job whose data lacks tenantId, with retries allowed (attempts: 3),
// the way a buggy Node.js producer would. The Conveyor worker must fail it WITHOUT retry.
// usage: node worker_invalid_job.mjs <port> <prefix> <jobId>
import { Queue } from 'bullmq';

const [port, prefix, jobId] = process.argv.slice(2);
const queue = new Queue('workflow.execute.us', {
  prefix,
  connection: { host: '127.0.0.1', port: Number(port) },
});
try {
  const job = await queue.add(
    'workflow.execute',
    { executionId: jobId, workflowId: 'wf-node', region: 'us' },
    { jobId, attempts: 3, backoff: { type: 'fixed', delay: 100 } },
  );
  console.log(JSON.stringify({ id: job.id }));
} finally {
  await queue.close();
}
