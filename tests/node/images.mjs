// One generate call and one streamed, through the official openai npm package, as
// OpenAI's image docs write them; only the base URL and the key differ (environment:
// OPENAI_BASE_URL, OPENAI_API_KEY, read by the SDK itself). Prints one JSON line.
import OpenAI from "openai";

const client = new OpenAI({ maxRetries: 0 });

const { data: result, response } = await client.images
  .generate({ model: "gpt-image-1", prompt: "a lighthouse at dusk", size: "64x64" })
  .withResponse();

const { data: stream, response: streamed } = await client.images.generate({
  model: "gpt-image-1", prompt: "a lighthouse at dusk", size: "64x64",
  stream: true, partial_images: 2,
  steps: 16, // atelier's own field (enough steps for previews to come)
}).withResponse();
const types = [];
let partials = 0;
for await (const event of stream) {
  types.push(event.type);
  if (event.type === "image_generation.partial_image") partials += 1;
}

console.log(JSON.stringify({
  generate: { b64_json: result.data[0].b64_json, job_id: response.headers.get("x-atelier-job-id") },
  stream: { types, partials, job_id: streamed.headers.get("x-atelier-job-id") },
}));
