// Command go_stub is the cheapest ext_proc server that speaks pdroute's EPP
// protocol: a floor for what Envoy + any endpoint picker can reach on a machine.
//
// It answers one request exactly as `pdroute epp` does (epp/handlers/stream.py),
// without parsing or scheduling: the destination is a round robin over the pool
// given on the command line.
//
// FULL_DUPLEX_STREAMED (Envoy's protocol_config on the request headers, or
// -body-mode duplex):
//   - request headers: no answer yet (the headers answer is held until the body
//     is complete);
//   - request body with end_of_stream: a headers response setting
//     x-gateway-destination-endpoint and content-length, clear_route_cache, the
//     same endpoint in dynamic metadata envoy.lb/x-gateway-destination-endpoint;
//     then a body response re-sending the body as one streamed_response chunk
//     with end_of_stream.
//
// BUFFERED (-body-mode buffered, or Envoy says so):
//   - request headers: an empty headers response (CONTINUE);
//   - request body: a body response carrying the header mutation,
//     clear_route_cache and the metadata (the body is left as it is).
//
// Both: request headers with end_of_stream (no body), or with request_body_mode
// NONE, are routed at once (no content-length change); response
// headers get an empty headers response; trailers get empty trailers responses;
// a response body gets an empty body response (BUFFERED) or is streamed back
// (FULL_DUPLEX_STREAMED).
//
// gRPC health (grpc.health.v1) on the same port reports SERVING for "",
// "readiness" and "envoy.service.ext_proc.v3.ExternalProcessor" (Envoy's health
// check in pdroute/stack/envoy.py names the service).
//
//	go_stub -addr 127.0.0.1:9002 -pool 127.0.0.1:8000,127.0.0.1:8001
//
// It prints "ready" on stdout once it listens.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"strconv"
	"strings"
	"sync/atomic"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	filterv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/types/known/structpb"
)

const (
	destinationHeader = "x-gateway-destination-endpoint"
	lbNamespace       = "envoy.lb"
	extProcService    = "envoy.service.ext_proc.v3.ExternalProcessor"
	// chunkLimit mirrors the EPP's CHUNK_LIMIT for streamed body mutations.
	chunkLimit = 62000
)

type server struct {
	extprocv3.UnimplementedExternalProcessorServer
	pool      []string
	next      atomic.Uint64
	forceMode string // "auto", "duplex" or "buffered"
	bodyLimit int
}

func (s *server) pick() string {
	n := s.next.Add(1) - 1
	return s.pool[n%uint64(len(s.pool))]
}

func hvo(key, value string) *corev3.HeaderValueOption {
	return &corev3.HeaderValueOption{
		Header:       &corev3.HeaderValue{Key: key, RawValue: []byte(value)},
		AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
	}
}

// routing is the common response of the routing answer; bodyLen < 0 leaves
// content-length alone.
func routing(ep string, bodyLen int) *extprocv3.CommonResponse {
	set := []*corev3.HeaderValueOption{hvo(destinationHeader, ep)}
	if bodyLen >= 0 {
		set = append(set, hvo("content-length", strconv.Itoa(bodyLen)))
	}
	return &extprocv3.CommonResponse{
		HeaderMutation:  &extprocv3.HeaderMutation{SetHeaders: set},
		ClearRouteCache: true,
	}
}

func lbMetadata(ep string) *structpb.Struct {
	return &structpb.Struct{Fields: map[string]*structpb.Value{
		lbNamespace: structpb.NewStructValue(&structpb.Struct{Fields: map[string]*structpb.Value{
			destinationHeader: structpb.NewStringValue(ep),
		}}),
	}}
}

func streamedBody(body []byte, request bool, end bool) []*extprocv3.ProcessingResponse {
	var out []*extprocv3.ProcessingResponse
	pos := 0
	for {
		nxt := pos + chunkLimit
		last := nxt >= len(body)
		if last {
			nxt = len(body)
		}
		common := &extprocv3.CommonResponse{BodyMutation: &extprocv3.BodyMutation{
			Mutation: &extprocv3.BodyMutation_StreamedResponse{
				StreamedResponse: &extprocv3.StreamedBodyResponse{
					Body: body[pos:nxt], EndOfStream: end && last,
				},
			},
		}}
		if request {
			out = append(out, &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{
				RequestBody: &extprocv3.BodyResponse{Response: common}}})
		} else {
			out = append(out, &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{
				ResponseBody: &extprocv3.BodyResponse{Response: common}}})
		}
		if last {
			return out
		}
		pos = nxt
	}
}

const (
	phaseHeaders = iota
	phaseBody
	phaseResponse
)

func (s *server) Process(stream extprocv3.ExternalProcessor_ProcessServer) error {
	phase := phaseHeaders
	buffered := s.forceMode == "buffered"
	noBody := false // request_body_mode NONE: route on the headers
	respMode := filterv3.ProcessingMode_NONE
	var chunks []byte
	send := func(r *extprocv3.ProcessingResponse) error { return stream.Send(r) }
	route := func() error {
		ep := s.pick()
		body := chunks
		chunks = nil
		phase = phaseResponse
		if buffered {
			return send(&extprocv3.ProcessingResponse{
				Response: &extprocv3.ProcessingResponse_RequestBody{
					RequestBody: &extprocv3.BodyResponse{Response: routing(ep, len(body))}},
				DynamicMetadata: lbMetadata(ep),
			})
		}
		if err := send(&extprocv3.ProcessingResponse{
			Response: &extprocv3.ProcessingResponse_RequestHeaders{
				RequestHeaders: &extprocv3.HeadersResponse{Response: routing(ep, len(body))}},
			DynamicMetadata: lbMetadata(ep),
		}); err != nil {
			return err
		}
		for _, r := range streamedBody(body, true, true) {
			if err := send(r); err != nil {
				return err
			}
		}
		return nil
	}
	for {
		req, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		switch m := req.Request.(type) {
		case *extprocv3.ProcessingRequest_RequestHeaders:
			if phase != phaseHeaders {
				continue
			}
			if pc := req.GetProtocolConfig(); pc != nil {
				respMode = pc.GetResponseBodyMode()
				noBody = pc.GetRequestBodyMode() == filterv3.ProcessingMode_NONE
				if s.forceMode == "auto" {
					switch pc.GetRequestBodyMode() {
					case filterv3.ProcessingMode_BUFFERED, filterv3.ProcessingMode_BUFFERED_PARTIAL:
						buffered = true
					}
				}
			}
			if m.RequestHeaders.GetEndOfStream() || noBody {
				ep := s.pick()
				phase = phaseResponse
				if err := send(&extprocv3.ProcessingResponse{
					Response: &extprocv3.ProcessingResponse_RequestHeaders{
						RequestHeaders: &extprocv3.HeadersResponse{Response: routing(ep, -1)}},
					DynamicMetadata: lbMetadata(ep),
				}); err != nil {
					return err
				}
				continue
			}
			phase = phaseBody
			if buffered {
				if err := send(&extprocv3.ProcessingResponse{
					Response: &extprocv3.ProcessingResponse_RequestHeaders{
						RequestHeaders: &extprocv3.HeadersResponse{}},
				}); err != nil {
					return err
				}
			}
		case *extprocv3.ProcessingRequest_RequestBody:
			if phase != phaseBody {
				continue
			}
			b := m.RequestBody
			if len(chunks)+len(b.GetBody()) > s.bodyLimit {
				return fmt.Errorf("request body over %d bytes", s.bodyLimit)
			}
			chunks = append(chunks, b.GetBody()...)
			if b.GetEndOfStream() || b.GetEndOfStreamWithoutMessage() || buffered {
				if err := route(); err != nil {
					return err
				}
			}
		case *extprocv3.ProcessingRequest_RequestTrailers:
			if phase == phaseBody {
				if err := route(); err != nil {
					return err
				}
			}
			if err := send(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestTrailers{
				RequestTrailers: &extprocv3.TrailersResponse{}}}); err != nil {
				return err
			}
		case *extprocv3.ProcessingRequest_ResponseHeaders:
			if err := send(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{
				ResponseHeaders: &extprocv3.HeadersResponse{Response: &extprocv3.CommonResponse{}}}}); err != nil {
				return err
			}
		case *extprocv3.ProcessingRequest_ResponseBody:
			b := m.ResponseBody
			if respMode == filterv3.ProcessingMode_FULL_DUPLEX_STREAMED {
				for _, r := range streamedBody(b.GetBody(), false, b.GetEndOfStream() || b.GetEndOfStreamWithoutMessage()) {
					if err := send(r); err != nil {
						return err
					}
				}
			} else if err := send(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{
				ResponseBody: &extprocv3.BodyResponse{}}}); err != nil {
				return err
			}
		case *extprocv3.ProcessingRequest_ResponseTrailers:
			if err := send(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseTrailers{
				ResponseTrailers: &extprocv3.TrailersResponse{}}}); err != nil {
				return err
			}
		}
	}
}

func main() {
	addr := flag.String("addr", "127.0.0.1:9002", "listen address host:port (port 0: any free port, printed)")
	pool := flag.String("pool", "", "comma-separated ip:port endpoints (round robin)")
	mode := flag.String("body-mode", "auto", "auto (from Envoy's protocol_config), duplex or buffered")
	limit := flag.Int("body-limit", 16<<20, "largest request body in bytes")
	flag.Parse()
	if *pool == "" {
		log.Fatal("-pool: at least one ip:port is required")
	}
	switch *mode {
	case "auto", "duplex", "buffered":
	default:
		log.Fatalf("-body-mode: expected auto, duplex or buffered, got %q", *mode)
	}
	lis, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatalf("-addr %s: %v", *addr, err)
	}
	gs := grpc.NewServer()
	extprocv3.RegisterExternalProcessorServer(gs, &server{
		pool: strings.Split(*pool, ","), forceMode: *mode, bodyLimit: *limit,
	})
	hs := health.NewServer()
	for _, svc := range []string{"", "readiness", extProcService} {
		hs.SetServingStatus(svc, healthpb.HealthCheckResponse_SERVING)
	}
	healthpb.RegisterHealthServer(gs, hs)
	fmt.Fprintf(os.Stdout, "listening %s\nready\n", lis.Addr())
	if err := gs.Serve(lis); err != nil {
		log.Fatal(err)
	}
}
